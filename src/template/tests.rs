//! The template set: the built-ins, files overriding them, the checks at
//! load, language fallback, and hostile values.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// The problems of a load that must fail, one `key: problem` a line.
fn problems(r: Result<Templates, Vec<(&'static str, String)>>) -> String {
    match r {
        Ok(_) => panic!("loaded"),
        Err(p) => p
            .iter()
            .map(|(k, p)| format!("{k}: {p}"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn vars(kind: Kind) -> BTreeMap<&'static str, String> {
    sample(kind)
}

#[test]
fn every_builtin_kind_renders_with_its_variables() {
    let t = Templates::builtin();
    for kind in Kind::ALL {
        let r = t.render(kind, "en", &vars(kind)).unwrap();
        // The digest is about no case.
        assert!(
            matches!(kind, Kind::Digest | Kind::Alert) || r.subject.contains("[Support #42]"),
            "{kind:?}: {}",
            r.subject
        );
        assert!(
            r.body.ends_with('\n') && !r.body.starts_with('\n'),
            "{kind:?}: {:?}",
            r.body
        );
        assert_eq!(r.language, "en");
    }
    // The same built-in text as before templates (golden).
    let r = t.render(Kind::Ack, "en", &vars(Kind::Ack)).unwrap();
    assert_eq!(r.subject, "[Support #42] Re: <subject>");
    assert!(r
        .body
        .starts_with("Hello <customer_name>,\n\nthank you for writing to us."));
    let r = t.render(Kind::Relay, "en", &vars(Kind::Relay)).unwrap();
    assert_eq!(
        r.body,
        "Thank you, the fix is live.\nKind regards\n\n-- \n<support_name> · case #42\n"
    );
}

#[test]
fn a_file_in_dir_replaces_the_builtin_and_languages_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "ack.de.txt",
        "Subject: {{ case_tag }} Eingang: {{ subject }}\n\nGuten Tag {{ customer_name }},\n",
    );
    write(
        dir.path(),
        "notice.txt",
        "Subject: moved {{ case_id }}\n\nneutral\n",
    );
    write(
        dir.path(),
        "ack.de.txt~",
        "an editor's backup, ignored {{ nonsense",
    );
    let t = Templates::load(Some(dir.path()), None).unwrap();
    let de = t.render(Kind::Ack, "de", &vars(Kind::Ack)).unwrap();
    assert_eq!(de.subject, "[Support #42] Eingang: <subject>");
    assert_eq!(de.language, "de");
    // A region falls back to its language.
    assert_eq!(
        t.render(Kind::Ack, "de-AT", &vars(Kind::Ack))
            .unwrap()
            .language,
        "de"
    );
    assert_eq!(
        t.render(Kind::Ack, "de_CH", &vars(Kind::Ack))
            .unwrap()
            .language,
        "de"
    );
    // No Swedish ack: the neutral file would come next, then English.
    assert_eq!(
        t.render(Kind::Ack, "sv", &vars(Kind::Ack))
            .unwrap()
            .language,
        "en"
    );
    let n = t.render(Kind::Notice, "fr", &vars(Kind::Notice)).unwrap();
    assert_eq!((n.subject.as_str(), n.language.as_str()), ("moved 42", ""));
    assert!(t.languages(Kind::Ack).contains("de"));
}

#[test]
fn an_unknown_variable_is_refused_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "ack.en.txt",
        "Subject: {{ subject }}\n\nHello,\n\nyour {{ tikcet }} is open.\n",
    );
    let p = problems(Templates::load(Some(dir.path()), None));
    let file = dir.path().join("ack.en.txt").display().to_string();
    assert!(p.contains(&format!("{file}:5:")), "{p}");
    assert!(p.contains("unknown variable \"tikcet\""), "{p}");
    assert_eq!(p.lines().count(), 1, "{p}");
}

#[test]
fn syntax_errors_missing_subjects_and_unknown_kinds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "survey.txt", "Subject: x\n\n{% if %}\n");
    write(dir.path(), "relay.en.txt", "Hello {{ customer_name }}\n");
    write(dir.path(), "welcome.txt", "Subject: x\n\ny\n");
    write(dir.path(), "ack.Deutsch!.txt", "Subject: x\n\ny\n");
    let p = problems(Templates::load(Some(dir.path()), None));
    assert!(p.contains("survey.txt:3: syntax error"), "{p}");
    assert!(
        p.contains("relay.en.txt:1: a template starts with a line \"Subject: ...\""),
        "{p}"
    );
    assert!(p.contains("no mail is called \"welcome\""), "{p}");
    assert!(
        p.contains("\"deutsch!\" is not a language tag")
            || p.contains("\"Deutsch!\" is not a language tag"),
        "{p}"
    );
}

#[test]
fn the_older_ack_key_is_the_body_of_the_ack_in_every_language() {
    let dir = tempfile::tempdir().unwrap();
    let ack = dir.path().join("ack.txt");
    std::fs::write(&ack, "Case {{case_id}} by {{ eta }}.\n").unwrap();
    let t = Templates::load(None, Some(&ack)).unwrap();
    let r = t.render(Kind::Ack, "de", &vars(Kind::Ack)).unwrap();
    assert_eq!(r.subject, "[Support #42] Re: <subject>");
    assert_eq!(r.body, "Case 42 by <eta>.\n");
    // Its line numbers are the file's own.
    std::fs::write(&ack, "Hello\n{{ nope }}\n").unwrap();
    let p = Templates::load(None, Some(&ack))
        .map(|_| ())
        .unwrap_err()
        .iter()
        .map(|(k, p)| format!("{k}: {p}"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(p.contains(&format!("{}:2:", ack.display())), "{p}");
}

#[test]
fn a_template_that_loops_for_ever_runs_out_of_fuel() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ack.txt", "Subject: x\n\n{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}\n");
    let p = problems(Templates::load(Some(dir.path()), None));
    assert!(p.contains("ack.txt:3: ") && p.contains("fuel"), "{p}");
}

/// Attack: a customer writes template syntax, header lines and bidi
/// controls into the subject and their name. Printed as text, on one
/// line; nothing runs.
#[test]
fn values_are_data_never_template_nor_headers() {
    let t = Templates::builtin();
    let mut v = vars(Kind::Ack);
    v.insert(
        "subject",
        one_line("{{ 7*7 }} {% for x in range(9) %}X{% endfor %}\r\nBcc: evil@example.org"),
    );
    v.insert("customer_name", one_line("Eve\u{202e}gnp.exe\nX-Header: 1"));
    let r = t.render(Kind::Ack, "en", &v).unwrap();
    assert_eq!(
        r.subject,
        "[Support #42] Re: {{ 7*7 }} {% for x in range(9) %}X{% endfor %}  Bcc: evil@example.org"
    );
    assert!(
        r.body.starts_with("Hello Evegnp.exe X-Header: 1,\n"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("49"));
    // A subject of 5,000 characters stays one line.
    v.insert("subject", "ä".repeat(5000));
    let r = t.render(Kind::Ack, "en", &v).unwrap();
    assert!(!r.subject.contains('\n') && r.subject.chars().count() > 5000);
}

#[test]
fn language_tags_are_normalised_or_refused() {
    assert_eq!(normal_lang("de").as_deref(), Some("de"));
    assert_eq!(normal_lang(" DE-at ").as_deref(), Some("de-at"));
    assert_eq!(normal_lang("pt_BR").as_deref(), Some("pt-br"));
    assert_eq!(normal_lang("zh-Hant-TW").as_deref(), Some("zh-hant"));
    assert_eq!(normal_lang("xx-INVALID!!").as_deref(), Some("xx"));
    assert_eq!(normal_lang(&"x".repeat(10_000)), None);
    assert_eq!(normal_lang("1de"), None);
    assert_eq!(normal_lang(""), None);
}

/// The example in docs/configuration.md is a working template.
#[test]
fn the_documented_example_renders() {
    let doc = include_str!("../../docs/configuration.md");
    let start = doc.find("```\nSubject: {{ case_tag }} We have it").unwrap() + 4;
    let end = start + doc[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ack.txt", &doc[start..end]);
    let t = Templates::load(Some(dir.path()), None).unwrap();
    let mut v = vars(Kind::Ack);
    v.insert("tier", "Tier 2".into());
    let r = t.render(Kind::Ack, "en", &v).unwrap();
    assert_eq!(r.subject, "[Support #42] We have it: <subject>");
    assert!(
        r.body
            .contains("Our specialists have your case.\n<support_name>\n"),
        "{}",
        r.body
    );
    v.insert("tier", "Frontline".into());
    let r = t.render(Kind::Ack, "en", &v).unwrap();
    assert!(
        !r.body.contains("specialists") && !r.body.contains("\n\n\n"),
        "{}",
        r.body
    );
}

/// A variable misspelt in a branch the sample values never reach is
/// refused too (it would fail on every real case of that tier).
#[test]
fn an_unknown_variable_in_an_untaken_branch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "notice.txt",
        "Subject: x\n\n{% if tier == \"Tier 2\" %}\n{{ tikcet }}\n{% endif %}\n{% set n = 3 %}{{ n }}\n",
    );
    let p = problems(Templates::load(Some(dir.path()), None));
    assert!(p.starts_with("templates.dir: "), "{p}");
    assert!(
        p.contains("notice.txt:4: unknown variable \"tikcet\""),
        "{p}"
    );
    assert!(!p.contains("\"n\""), "a variable it sets is known: {p}");
}

#[test]
fn other_file_names_are_errors_and_leftovers_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ack.de.TXT", "Subject: x\n\ny\n");
    write(dir.path(), "ack.de.txt.bak", "junk {{");
    write(dir.path(), ".ack.de.txt.swp", "junk {{");
    write(dir.path(), "ack.de.txt.dpkg-old", "junk {{");
    let p = problems(Templates::load(Some(dir.path()), None));
    assert_eq!(p.lines().count(), 1, "{p}");
    assert!(p.contains("ack.de.TXT: not a template file name"), "{p}");
}

#[test]
fn a_fifo_or_a_device_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("ack.txt")).unwrap();
    let p = problems(Templates::load(Some(dir.path()), None));
    assert!(p.contains("ack.txt: not a regular file"), "{p}");
}

/// The older key's file was literal text with `{{name}}` fields: a
/// `{%` in it stays text; its problems name `templates.ack`.
#[test]
fn the_older_ack_file_keeps_its_literal_text_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let ack = dir.path().join("ack.txt");
    std::fs::write(
        &ack,
        "100{% sure {# not a comment #}, {% endraw %} case {{case_id}}\n",
    )
    .unwrap();
    let t = Templates::load(None, Some(&ack)).unwrap();
    let r = t.render(Kind::Ack, "en", &vars(Kind::Ack)).unwrap();
    assert_eq!(
        r.body,
        "100{% sure {# not a comment #}, {% endraw %} case 42\n"
    );
    std::fs::write(&ack, "{{ nope }}\n").unwrap();
    let p = problems(Templates::load(Some(dir.path()), Some(&ack)));
    assert!(p.starts_with("templates.ack: "), "{p}");
    assert_eq!(
        p.lines().count(),
        1,
        "the file is read once, as the ack key says: {p}"
    );
}

#[test]
fn the_answer_cannot_go_into_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "relay.txt",
        "Subject: Re: {{ answer }}\n\n{{ answer }}\n",
    );
    let p = problems(Templates::load(Some(dir.path()), None));
    assert!(p.contains("relay.txt:1: answer (many lines)"), "{p}");
    // Nor the history, nor the digest's report.
    write(dir.path(), "relay.txt", "Subject: Re\n\n{{ answer }}\n");
    write(
        dir.path(),
        "forward.txt",
        "Subject: {{ history }}\n\n{{ history }}\n",
    );
    write(dir.path(), "digest.de.txt", "Subject: {{report}}\n\nx\n");
    let p = problems(Templates::load(Some(dir.path()), None));
    assert!(p.contains("forward.txt:1: history (many lines)"), "{p}");
    assert!(p.contains("digest.de.txt:1: report (many lines)"), "{p}");
}

#[test]
fn only_a_relay_has_the_answer() {
    assert!(Kind::Relay.variables().contains(&"answer"));
    for kind in [Kind::Ack, Kind::Notice, Kind::Survey] {
        assert!(!kind.variables().contains(&"answer"), "{kind:?}");
        assert!(kind.variables().contains(&"support_address"), "{kind:?}");
    }
}

/// Golden files: every built-in kind in every language it ships in,
/// rendered with the same realistic values (the date and the wait in the
/// template's language), compared with `src/template/golden/`. A change
/// to a built-in text shows in review as a change to its golden file;
/// `ESCALATOR_UPDATE_GOLDEN=1 cargo test --lib golden` writes them anew.
#[test]
fn golden_files_for_every_builtin_kind_and_language() {
    let t = Templates::builtin();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/template/golden");
    let update = std::env::var_os("ESCALATOR_UPDATE_GOLDEN").is_some();
    let due = chrono::DateTime::parse_from_rfc3339("2026-11-23T16:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut seen = 0;
    for kind in Kind::ALL {
        for lang in t.languages(kind) {
            let mut v = sample(kind);
            for (k, value) in [
                ("customer_name", "Maria Muster"),
                ("customer", "maria@example.org"),
                ("subject", "Printer offline"),
                ("tier", "Tier 2"),
                ("support_name", "Example Support"),
                ("support_address", "support@example.com"),
            ] {
                if v.contains_key(k) {
                    v.insert(k, value.to_string());
                }
            }
            if v.contains_key("eta") {
                let tz = chrono_tz::Europe::Berlin;
                v.insert("eta", crate::locale::format_eta(due, tz, &lang));
                let wait = std::time::Duration::from_secs(8 * 3600);
                v.insert("eta_in_words", crate::locale::eta_words(wait, true, &lang));
            }
            let r = t.render(kind, &lang, &v).unwrap();
            assert_eq!(r.language, lang);
            let mut text = format!("Subject: {}\n\n{}", r.subject, r.body);
            if let Some(html) = r.html {
                text.push_str("\n==== text/html ====\n");
                text.push_str(&html);
            }
            let path = dir.join(format!("{}.{lang}.txt", kind.name()));
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (ESCALATOR_UPDATE_GOLDEN=1 writes it)",
                    path.display()
                )
            });
            assert_eq!(
                text,
                want,
                "{} differs from its golden file",
                path.display()
            );
            seen += 1;
        }
    }
    // Four customer kinds in seven languages, five staff kinds (the
    // OAuth 2 alert among them) in English.
    assert_eq!(seen, 4 * 7 + 5);
}

/// An `.html` beside a `.txt` is its alternative: values are escaped
/// (a subject with `<script>` is text), the many-line answer keeps its
/// lines with the `linebreaks` filter, and an `.html` of the admin's
/// beside a built-in text is refused (it would never be sent).
#[test]
fn html_alternatives_escape_every_value() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "relay.de.txt",
        "Subject: {{ case_tag }} Re: {{ subject }}\n\n{{ answer }}\n",
    );
    write(
        dir.path(),
        "relay.de.html",
        "<p>{{ subject }}</p>\n<div>{{ answer|linebreaks }}</div>\n",
    );
    let t = Templates::load(Some(dir.path()), None).unwrap();
    let mut v = sample(Kind::Relay);
    v.insert("subject", "<script>alert(1)</script> & \"x\"".into());
    v.insert("answer", "line <b>1</b>\nline 2".into());
    let r = t.render(Kind::Relay, "de-CH", &v).unwrap();
    assert_eq!(
        r.html.as_deref(),
        Some("<p>&lt;script&gt;alert(1)&lt;&#x2f;script&gt; &amp; &quot;x&quot;</p>\n<div>line &lt;b&gt;1&lt;/b&gt;<br>\nline 2</div>\n")
    );
    // The text part is as typed (text is never interpreted).
    assert!(r.subject.contains("<script>alert(1)</script>"));
    // Other languages: the built-in text, with no HTML.
    assert_eq!(t.render(Kind::Relay, "fr", &v).unwrap().html, None);

    write(dir.path(), "ack.fr.html", "<p>{{ subject }}</p>\n");
    let p = problems(Templates::load(Some(dir.path()), None));
    assert!(
        p.contains("ack.fr.html: an HTML template is the alternative"),
        "{p}"
    );
}

#[test]
fn a_word_of_the_subject_is_not_a_variable() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "warning.de.txt",
        "Subject: {{ case_tag }} answer history report: {{ subject }}\n\n{{ history }}\n",
    );
    assert!(Templates::load(Some(dir.path()), None).is_ok());
    write(
        dir.path(),
        "warning.de.txt",
        "Subject: {{ case_tag ~ history|upper }}\n\nx\n",
    );
    let p = problems(Templates::load(Some(dir.path()), None));
    assert!(p.contains("history (many lines)"), "{p}");
}

#[test]
fn an_admin_s_ack_in_one_language_is_pointed_out_beside_our_others() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "ack.en.txt",
        "Subject: {{ case_tag }}\n\nours\n",
    );
    let t = Templates::load(Some(dir.path()), None).unwrap();
    let notes = t.mixed_hands();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains(
            "your ack replaces the built-in one in en; customers in de, es, fr, it, nl, pt"
        ),
        "{notes:?}"
    );
    write(
        dir.path(),
        "ack.txt",
        "Subject: {{ case_tag }}\n\nours everywhere\n",
    );
    assert!(Templates::load(Some(dir.path()), None)
        .unwrap()
        .mixed_hands()
        .is_empty());
    assert!(Templates::builtin().mixed_hands().is_empty());
}
