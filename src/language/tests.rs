//! Which language a customer gets: each clue in its turn, and what a
//! stranger can put in the headers and the text.

use super::*;
use crate::config::Config;
use crate::message::parse;

fn config(extra: &str) -> Config {
    let tiers = format!(
        "[[tiers]]\nname = \"Frontline\"\nfirst_response = \"4h\"\nstaff = [\"agent@example.test\"]\n{extra}"
    );
    crate::testing::config_from(std::path::Path::new("/nonexistent"), "", &tiers)
}

fn mail(headers: &str, body: &str) -> InboundMail {
    parse(
        format!(
            "From: c@example.org\r\nTo: support@example.test\r\nSubject: s\r\nMessage-ID: <m@x>\r\n{headers}\r\n{body}\r\n"
        )
        .as_bytes(),
    )
}

fn choice(config: &Config, clues: Clues<'_>) -> (String, &'static str) {
    let c = choose(config, &clues);
    (c.language, c.source.as_str())
}

fn from_mail<'a>(m: &'a InboundMail) -> Clues<'a> {
    Clues {
        address: "c@example.org",
        mail: Some(m),
        queue: "default",
        ..Clues::default()
    }
}

const FRENCH: &str = "Bonjour, depuis la mise à jour de ce matin, je ne peux plus \
    me connecter à mon compte. Pourriez-vous vérifier ce qui se passe, s'il vous plaît ?";
const GERMAN: &str = "Guten Tag, seit dem Update heute Morgen kann ich mich nicht mehr \
    bei meinem Konto anmelden. Könnten Sie bitte prüfen, was da los ist?";

#[test]
fn content_language_then_accept_language_then_the_text() {
    let c = config("");
    let m = mail("Content-Language: de-AT\r\nAccept-Language: fr\r\n", FRENCH);
    assert_eq!(
        choice(&c, from_mail(&m)),
        ("de-at".into(), "content-language")
    );
    let m = mail("Accept-Language: es-ES;q=0.5, it;q=0.9, ja\r\n", FRENCH);
    // ja has no template: the most wanted of the rest.
    assert_eq!(choice(&c, from_mail(&m)), ("it".into(), "accept-language"));
    let m = mail("", FRENCH);
    assert_eq!(choice(&c, from_mail(&m)), ("fr".into(), "detected"));
    let m = mail("", GERMAN);
    assert_eq!(choice(&c, from_mail(&m)), ("de".into(), "detected"));
}

#[test]
fn a_short_text_or_detection_off_gets_the_queue_s_language_or_the_default() {
    let c = config("");
    let ok = mail("", "ok");
    assert_eq!(choice(&c, from_mail(&ok)), ("en".into(), "default"));
    let c = config("[language]\ndefault = \"nl\"\ndetect = false\n");
    let m = mail("", FRENCH);
    assert_eq!(choice(&c, from_mail(&m)), ("nl".into(), "default"));
}

#[test]
fn the_customer_s_setting_beats_the_case_which_beats_the_mail() {
    let c = config("");
    let m = mail("Content-Language: fr\r\n", FRENCH);
    let mut clues = from_mail(&m);
    clues.case = Some("it");
    assert_eq!(choice(&c, clues), ("it".into(), "case"));
    clues.customer = Some("pt-BR");
    assert_eq!(choice(&c, clues), ("pt-br".into(), "customer"));
}

#[test]
fn domains_and_their_subdomains() {
    let c = config("[language.domains]\n\"example.de\" = \"de\"\n\"fr\" = \"fr\"\n");
    let m = mail("Content-Language: it\r\n", "ok");
    let mut clues = from_mail(&m);
    clues.address = "max@mail.Example.DE";
    assert_eq!(choice(&c, clues), ("de".into(), "domain"));
    clues.address = "anne@orange.fr";
    assert_eq!(choice(&c, clues), ("fr".into(), "domain"));
    clues.address = "x@example.com";
    assert_eq!(choice(&c, clues), ("it".into(), "content-language"));
}

/// A stranger's headers choose a language or nothing; none of them
/// reaches a template name, a header or the case as anything but a
/// normalised tag with templates.
#[test]
fn hostile_language_headers_fall_through() {
    let c = config("");
    let huge = format!("Content-Language: {}\r\n", "de-".repeat(4000));
    for h in [
        huge.as_str(),
        "Content-Language: xx-INVALID\r\n",
        "Content-Language: ../../etc/passwd\r\n",
        "Content-Language: {{ case_id }}\r\n",
        "Content-Language: de\u{202e}\r\n",
        "Accept-Language: *;q=1, en;q=0\r\n",
        "Accept-Language: de;q=NaN\r\n",
        "Content-Language: ,,,,,\r\n",
    ] {
        let m = mail(h, "ok");
        let got = choice(&c, from_mail(&m));
        let shown: String = h.chars().take(40).collect();
        assert!(
            got == ("en".into(), "default")
                || (got.1 == "content-language" && got.0.starts_with("de") && got.0.len() <= 5),
            "{shown:?}: {got:?}"
        );
    }
    // The 10 KB header is read only so far, and its first tag counts.
    let m = mail(&huge, "ok");
    assert_eq!(choice(&c, from_mail(&m)).0, "de-de");
}

#[test]
fn quoted_text_and_the_signature_do_not_choose() {
    let c = config("");
    // An English reply above a long German quote and a French signature.
    let body = format!(
        "Thanks, that worked.\r\n\r\nOn Mon, 23 Nov 2026, Support wrote:\r\n> {GERMAN}\r\n> {GERMAN}\r\n-- \r\n{FRENCH}\r\n"
    );
    let m = mail("", &body);
    assert_eq!(choice(&c, from_mail(&m)), ("en".into(), "default"));
}

#[test]
fn a_text_in_a_language_without_templates_is_not_forced_into_one() {
    let c = config("");
    let m = mail(
        "",
        "Dzień dobry, od dzisiejszej aktualizacji nie mogę zalogować się do swojego konta. Proszę o sprawdzenie.",
    );
    // Polish has no template: the detector is allowed only ours and is
    // sure of none of them, so the default speaks.
    assert_eq!(choice(&c, from_mail(&m)), ("en".into(), "default"));
}
