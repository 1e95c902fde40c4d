//! Quote: where the text a person wrote now ends and quoted earlier mail
//! begins. Pure.
//!
//! A staff reply to a forward is passed on to the customer, so what must
//! never go with it is the forward itself (summary, history, notes). The
//! first defence is ours: every staff-facing mail carries a marker line
//! with a token unique to that mail, and a reply is cut where the marker
//! appears, in any language and any client. The second is knowledge of
//! clients: reply headers in seven languages, Outlook's separators, and
//! the HTML containers clients put quotes in (cut before HTML becomes
//! text). [`leaks`] then checks what is left for anything of ours.

/// The words of the marker line; the token follows in `[ref: ...]`.
pub const MARKER_WORDS: &str = "Reply above this line";

const MARKER_LOWER: &str = "reply above this line";

/// The marker line of a staff-facing mail whose token is `token` (the
/// local part of its Message-ID: unique per mail, keyed).
pub fn marker_line(token: &str) -> String {
    format!("──── {MARKER_WORDS} ──── [ref: {token}] ────")
}

/// Lines of the forward's summary: if one of them is still in a relay,
/// the cutting failed and nothing may go out.
const SUMMARY_LINES: &[&str] = &[
    "customer waiting:",
    "why escalated:",
    "earlier cases from this customer:",
    "==== conversation ====",
    "reply to this mail to answer the customer",
];

/// Why a relay must not go out: it still carries our marker's token or
/// a line of the summary. None when it is clean.
pub fn leaks(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    if lower.contains("[ref: c") || lower.contains(&MARKER_WORDS.to_lowercase()) {
        return Some("the reply still contains the forward's marker line".into());
    }
    SUMMARY_LINES
        .iter()
        .find(|l| lower.contains(*l))
        .map(|l| format!("the reply still contains the forward's summary ({l:?})"))
}

/// The verb of "On Monday, X wrote:" in the languages of common clients
/// (German and Dutch put the name after it: "Am ... schrieb X:").
const WROTE: &[&str] = &[
    "wrote",
    "schrieb",
    "a écrit",
    "escribió",
    "ha scritto",
    "schreef",
    "escreveu",
];

/// A line (or its end) that introduces a quote: ends with a colon and
/// has the verb as a word.
fn is_wrote(lower: &str) -> bool {
    let t = lower.trim_end();
    t.ends_with(':')
        && WROTE.iter().any(|w| {
            t.match_indices(w).any(|(i, _)| {
                let before = t[..i].chars().next_back();
                let after = t[i + w.len()..].chars().next();
                !before.is_some_and(char::is_alphanumeric)
                    && !after.is_some_and(char::is_alphanumeric)
            })
        })
}

/// "-----Original Message-----" in the same languages.
const ORIGINAL: &[&str] = &[
    "-----original message-----",
    "-----ursprüngliche nachricht-----",
    "-----message d'origine-----",
    "-----mensaje original-----",
    "-----messaggio originale-----",
    "-----oorspronkelijk bericht-----",
    "-----mensagem original-----",
    "---------- forwarded message",
];

/// Outlook's quoted header block: a From line, then Sent/Date.
const FROM: &[&str] = &["from:", "von:", "de:", "de :", "da:", "van:"];
const SENT: &[&str] = &[
    "sent:",
    "date:",
    "to:",
    "gesendet:",
    "datum:",
    "an:",
    "envoyé :",
    "envoyé:",
    "enviado:",
    "enviada:",
    "inviato:",
    "verzonden:",
    "para:",
    "à :",
    "a:",
    "aan:",
];

/// The text a person wrote now: quoted earlier mail, our marker and
/// everything below it left out.
pub fn new_text(body: &str) -> String {
    let lines: Vec<&str> = body.lines().collect();
    // Each line folded once: the checks below look at a line and the next.
    let lower: Vec<String> = lines.iter().map(|l| l.trim().to_lowercase()).collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if lower[i].starts_with('>') {
            continue;
        }
        if starts_quote(&lower, i) {
            break;
        }
        out.push(*line);
    }
    out.join("\n").trim().to_string()
}

/// Does a quote (or our marker) begin at line `i`? `lower` holds the
/// lines trimmed and lower-cased.
fn starts_quote(lower: &[String], i: usize) -> bool {
    let l = lower[i].as_str();
    let next = lower.get(i + 1).map(String::as_str);
    // Every rule needs one of these; most lines of a mail have none.
    let candidate = l.contains(':')
        || l.starts_with('-')
        || l.starts_with('_')
        || l.contains("[ref: c")
        || l.contains(MARKER_LOWER)
        || next.is_some_and(|n| n.ends_with(':'));
    if !candidate {
        return false;
    }
    if l.contains(MARKER_LOWER) || l.contains("[ref: c") {
        return true;
    }
    if is_wrote(l) {
        return true;
    }
    // A "wrote:" line wrapped in two: "On Mon, 1 Jan 2024, Alice" and
    // "<alice@example.org> wrote:".
    let opens = ["on ", "am ", "le ", "el ", "il ", "op ", "em "];
    if opens.iter().any(|o| l.starts_with(o)) && next.is_some_and(is_wrote) {
        return true;
    }
    if ORIGINAL.iter().any(|o| l.starts_with(o)) {
        return true;
    }
    // Outlook's separator: a line of underscores before the headers.
    if l.len() >= 20 && l.chars().all(|c| c == '_') {
        return true;
    }
    FROM.iter().any(|f| l.starts_with(f))
        && next.is_some_and(|n| SENT.iter().any(|s| n.starts_with(s)))
}

/// Where clients start the quoted part of an HTML reply: Gmail's
/// `gmail_quote`, Outlook's `divRplyFwdMsg` and its `border-top`
/// separator, Apple Mail and Thunderbird's `blockquote`, and our marker.
const HTML_QUOTES: &[&str] = &[
    "class=\"gmail_quote",
    "class=gmail_quote",
    "id=\"divrplyfwdmsg\"",
    "id=divrplyfwdmsg",
    "border-top:solid",
    "border-top: solid",
    "<blockquote",
    "reply above this line",
    "[ref: c",
];

/// The new text of an HTML body: cut at the first quote container (at
/// the start of the tag that holds it), then turned into text.
pub fn html_new_text(html: &str) -> String {
    let lower = html.to_ascii_lowercase();
    let cut = HTML_QUOTES
        .iter()
        .filter_map(|m| lower.find(m))
        .min()
        .map(|at| lower[..at].rfind('<').unwrap_or(at))
        .unwrap_or(html.len());
    // `lower` is an ASCII case fold of `html`: same byte offsets, and a
    // `<` is always a character boundary.
    let head = html.get(..cut).unwrap_or(html);
    new_text(&mail_parser::decoders::html::html_to_text(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "Escalated to Tier 2: case #3 \"x\"\n\nCustomer waiting:  2h\n\
Why escalated:     stale\nEarlier cases from this customer: 0\n\n==== Conversation ====\n";

    #[test]
    fn cut_at_our_marker_whatever_the_client() {
        let marker = marker_line("c3.f4.abcdefabcdef");
        let reply = format!("Fixed it.\n\n{marker}\n{SUMMARY}");
        assert_eq!(new_text(&reply), "Fixed it.");
        // A client that rewrapped the marker line and translated nothing.
        let wrapped = format!(
            "Erledigt.\n\n──── Reply above this line\n──── [ref: c3.f4.abc] ────\n{SUMMARY}"
        );
        assert_eq!(new_text(&wrapped), "Erledigt.");
    }

    #[test]
    fn german_outlook_reply_does_not_leak_the_summary() {
        // Input: a German Outlook reply: no "wrote:", no "Original
        // Message": the whole forward went to the customer.
        let reply = format!(
            "Der Drucker ist repariert.\n\n-----Ursprüngliche Nachricht-----\n\
             Von: Support <support@example.test>\nGesendet: Montag, 30. November 2026 09:00\n{SUMMARY}"
        );
        assert_eq!(new_text(&reply), "Der Drucker ist repariert.");
        let headers_only = format!(
            "Erledigt.\n\nVon: Support <support@example.test>\nGesendet: Montag\nAn: tier2\n{SUMMARY}"
        );
        assert_eq!(new_text(&headers_only), "Erledigt.");
    }

    #[test]
    fn reply_headers_in_seven_languages_are_cut() {
        for (quote, lang) in [
            ("On Mon, 30 Nov 2026, Support wrote:", "en"),
            ("Am 30.11.2026 um 09:00 schrieb Support:", "de"),
            ("Le lun. 30 nov. 2026, Support a écrit :", "fr"),
            ("El lun, 30 nov 2026, Support escribió:", "es"),
            ("Il giorno lun 30 nov 2026 Support ha scritto:", "it"),
            ("Op ma 30 nov 2026 schreef Support:", "nl"),
            ("Em seg., 30 de nov. de 2026, Support escreveu:", "pt"),
            ("-----Message d'origine-----", "fr"),
            ("-----Mensaje original-----", "es"),
            ("-----Messaggio originale-----", "it"),
            ("-----Oorspronkelijk bericht-----", "nl"),
            ("-----Mensagem original-----", "pt"),
            ("De : Support\nEnvoyé : lundi", "fr"),
            ("De: Support\nEnviado: lunes", "es"),
            ("Da: Support\nInviato: lunedì", "it"),
            ("Van: Support\nVerzonden: maandag", "nl"),
            ("________________________________\nFrom: Support", "outlook"),
        ] {
            let reply = format!("Done.\n\n{quote}\n{SUMMARY}");
            assert_eq!(new_text(&reply), "Done.", "{lang}: {quote}");
            assert!(leaks(&new_text(&reply)).is_none());
        }
    }

    #[test]
    fn html_quote_containers_are_cut_before_conversion() {
        // Input: HTML-only replies (Outlook, Gmail, Apple Mail) whose
        // quoted forward carries the summary.
        for html in [
            "<div>Fixed.</div><div id=\"divRplyFwdMsg\"><b>From:</b> Support<br>Customer waiting: 2h</div>",
            "<div dir=ltr>Fixed.</div><div class=\"gmail_quote\"><div>On Mon</div><blockquote>Customer waiting: 2h</blockquote></div>",
            "<p>Fixed.</p><blockquote type=cite>Why escalated: stale</blockquote>",
            "<p>Fixed.</p><div style=\"border:none;border-top:solid #E1E1E1 1.0pt\"><p><b>Von:</b> Support</p></div><p>Customer waiting: 2h</p>",
        ] {
            let text = html_new_text(html);
            assert_eq!(text, "Fixed.", "{html}");
        }
    }

    #[test]
    fn leaks_are_found() {
        assert!(leaks("Thanks\nCustomer waiting:  2h").is_some());
        assert!(leaks("see [ref: c3.f4.x]").is_some());
        assert!(leaks("Replaced the fuser; it is fixed.").is_none());
    }

    proptest::proptest! {
        #[test]
        fn cutting_never_panics(s in "\\PC{0,200}") {
            let _ = new_text(&s);
            let _ = html_new_text(&s);
            let _ = leaks(&s);
        }
    }
}
