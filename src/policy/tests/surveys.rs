//! Surveys: a rating closes the loop, anything else is a follow-up (in
//! every built-in survey's language).

use super::*;

/// Alice's case, resolved an hour after it opened, its survey queued.
fn resolved_with_survey(c: &Config) -> (Case, Ctx<'_>) {
    let (mut case, _) = new_case(
        c,
        at(MON_9),
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let ctx = Ctx {
        config: c,
        now: at("2026-11-23T10:00:00Z"),
    };
    assert_eq!(resolve_case(&mut case, "agent", &ctx), vec![Action::Survey]);
    (case, ctx)
}

#[test]
fn a_follow_up_starting_with_a_digit_is_not_a_rating() {
    // Input: after the survey, "3rd floor printer still jams!" (short,
    // starts with 1-5) was taken as CSAT 3 and the case stayed resolved.
    let c = config();
    let (mut case, ctx) = resolved_with_survey(&c);
    for text in [
        "3rd floor printer still jams!",
        "2 more printers broke",
        "1 question",
    ] {
        assert_eq!(csat_reply(text), None, "{text}");
    }
    let jam = mail(
        "alice@example.org",
        "Re: x",
        "",
        "3rd floor printer still jams!",
    );
    on_message(&mut case, &jam, Role::Customer, None, &ctx);
    assert_eq!(case.csat, None);
    assert_eq!(case.status, Status::Open, "the follow-up reopens the case");
}

#[test]
fn csat_reply_is_recorded_and_other_replies_reopen_or_start_anew() {
    let c = config();
    let (mut case, ctx) = resolved_with_survey(&c);
    assert!(resolve_case(&mut case, "agent", &ctx).is_empty(), "once");
    let five = mail(
        "alice@example.org",
        "Re: x",
        "",
        "5\n\nOn Mon, Support wrote:\n> rate us",
    );
    assert!(!starts_follow_on_case(
        &case,
        &five,
        &Ctx {
            config: &c,
            now: at("2027-01-01T00:00:00Z")
        }
    ));
    assert!(on_message(&mut case, &five, Role::Customer, None, &ctx).is_empty());
    assert_eq!(case.csat, Some(5));
    assert_eq!(case.status, Status::Resolved);
    let more = mail("alice@example.org", "Re: x", "", "It broke again");
    assert!(!starts_follow_on_case(
        &case,
        &more,
        &Ctx {
            config: &c,
            now: at("2026-11-30T10:00:00Z")
        }
    ));
    assert!(starts_follow_on_case(
        &case,
        &more,
        &Ctx {
            config: &c,
            now: at("2026-12-08T10:00:00Z")
        }
    ));
    on_message(
        &mut case,
        &more,
        Role::Customer,
        None,
        &Ctx {
            config: &c,
            now: at("2026-11-30T10:00:00Z"),
        },
    );
    assert_eq!(case.status, Status::Open);
    assert!(case
        .new_events
        .iter()
        .any(|e| matches!(e.what, EventKind::Reopened { .. })));
}

/// A customer who answers a built-in survey the way it asks, in its
/// language ("5 (sehr gut)", "1 (mauvais)"), sent from a phone that adds
/// its signature line, gives a rating, never a new message that reopens
/// the case.
#[test]
fn every_builtin_survey_s_own_scale_words_are_a_rating() {
    let mut labels = 0;
    for (name, text) in crate::template::builtin_files() {
        if !name.starts_with("survey.") {
            continue;
        }
        // "1 (schlecht)", "5 (sehr gut)", "1 (mala)" as the text writes them.
        let flat = text.replace('\n', " ");
        for (i, _) in flat.match_indices(" (") {
            let Some(d) = flat[..i].chars().last().and_then(|c| c.to_digit(10)) else {
                continue;
            };
            let Some(end) = flat[i..].find(')') else {
                continue;
            };
            let label = format!("{d}{}", &flat[i..i + end + 1]);
            assert_eq!(csat_reply(&label), Some(d as u8), "{name}: {label:?}");
            labels += 1;
        }
    }
    assert_eq!(labels, 14, "two scale labels in each of seven surveys");
    for phone in [
        "Von meinem iPhone gesendet",
        "Envoyé de mon iPhone",
        "Enviado desde mi iPhone",
        "Enviado do meu iPhone",
        "Inviato da iPhone",
        "Verzonden vanaf mijn iPhone",
    ] {
        assert_eq!(
            csat_reply(&format!("4 sterne\n\n{phone}")),
            Some(4),
            "{phone}"
        );
    }
    for rating in [
        "1 estrella",
        "1 stella",
        "1 estrela",
        "1 ster",
        "5 puntos",
        "5 punti",
        "5 punten",
        "5 pontos",
        "5 sobre 5",
        "5 muchas gracias",
        "5 merci beaucoup",
        "5 grazie mille",
        "5 - sehr gut, vielen Dank",
        "5 – sehr gut",
        "5 « très bien »",
        "5 perfekt",
        "5 otimo",
    ] {
        assert_eq!(csat_reply(rating), rating[..1].parse().ok(), "{rating}");
    }
    // A line that only opens like a phone's signature is the customer's
    // text: "1" with a complaint below is a follow-up.
    for follow_up in [
        "1\nVon meinem Konto wurden 49 € doppelt abgebucht, bitte erstatten!",
        "1\nVon meinem Konto wurde doppelt abgebucht",
        "2\nInviato da voi il 3 maggio, il pacco non è mai arrivato",
        "3\nEnviado desde mi cuenta, pero nadie contesta",
        "4\nVerzonden vanaf mijn werklaptop omdat de app crasht",
    ] {
        assert_eq!(csat_reply(follow_up), None, "{follow_up}");
    }
    assert_eq!(csat_reply("4 von 5"), Some(4));
    assert_eq!(csat_reply("5 sur 5, très bien"), Some(5));
    // Still: a follow-up with a number is no rating.
    assert_eq!(csat_reply("3 Drucker im 2. Stock klemmen noch"), None);
}
