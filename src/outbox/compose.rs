//! Compose: outgoing mail as bytes. Pure. Every header value passes
//! through `one_line`, so nothing a customer wrote (a subject, a name, a
//! Message-ID) can add a header of its own; every mail carries the robot
//! stamps that keep other auto-responders (and other escalators) quiet.

use chrono::{DateTime, Utc};
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;
use mail_builder::MessageBuilder;

use crate::message::LOOP_HEADER;
use crate::template::one_line;

/// What a composed mail needs to know beyond its text.
pub struct Envelope<'a> {
    pub from_name: Option<&'a str>,
    pub from: &'a str,
    pub to_name: Option<&'a str>,
    pub to: &'a str,
    pub subject: &'a str,
    pub message_id: &'a str,
    /// The message this answers, and the thread before it.
    pub in_reply_to: Option<&'a str>,
    pub references: Vec<String>,
    /// `auto-replied` for answers to a message, `auto-generated` for
    /// other robot mail; None for a person's words we pass on.
    pub auto_submitted: Option<&'a str>,
    /// Where replies should go (forwards: back to the support mailbox).
    pub reply_to: Option<&'a str>,
    /// Original messages, attached as message/rfc822.
    pub attachments: Vec<Vec<u8>>,
    pub instance: &'a str,
    pub case_id: u64,
    pub date: DateTime<Utc>,
    /// `Content-Language` (RFC 3282): the language the text is in.
    pub language: Option<&'a str>,
    /// An HTML alternative of the text (then multipart/alternative).
    pub html: Option<&'a str>,
}

/// Keeps only what may stand inside `<...>` of a Message-ID.
pub fn clean_id(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | '"' | '\\' | ','))
        .collect()
}

/// Builds the mail; `io::Error` only if writing to a Vec failed.
pub fn compose(env: &Envelope, body: &str) -> std::io::Result<Vec<u8>> {
    let from_name = env.from_name.map(one_line).unwrap_or_default();
    let to_name = env.to_name.map(one_line).unwrap_or_default();
    let mut refs: Vec<String> = env
        .references
        .iter()
        .map(|r| clean_id(r))
        .filter(|r| !r.is_empty())
        .collect();
    // Threading needs only the root and the recent end of the chain.
    if refs.len() > 20 {
        let tail = refs.split_off(refs.len() - 19);
        refs.truncate(1);
        refs.extend(tail);
    }
    let mut b = MessageBuilder::new()
        .from((from_name, one_line(env.from)))
        .to((to_name, one_line(env.to)))
        .subject(one_line(env.subject))
        .message_id(clean_id(env.message_id))
        .date(env.date.timestamp())
        .header(LOOP_HEADER, Raw::new(clean_id(env.instance)))
        .header("X-Escalator-Case", Raw::new(env.case_id.to_string()))
        .header("X-Auto-Response-Suppress", Raw::new("All"));
    // A normalised tag ([a-z0-9-]): checked again, as it goes into a
    // header.
    if let Some(lang) = env.language.and_then(crate::template::normal_lang) {
        b = b.header("Content-Language", Raw::new(lang));
    }
    if let Some(a) = env.auto_submitted {
        b = b
            .header("Auto-Submitted", Raw::new(a.to_string()))
            .header("Precedence", Raw::new("bulk"));
    }
    if let Some(r) = env.reply_to {
        b = b.reply_to(one_line(r));
    }
    let text = body.replace("\r\n", "\n").replace('\n', "\r\n");
    let content = match env.html {
        Some(html) => MimePart::new(
            "multipart/alternative",
            vec![
                MimePart::new("text/plain", text),
                MimePart::new(
                    "text/html",
                    html.replace("\r\n", "\n").replace('\n', "\r\n"),
                ),
            ],
        ),
        None => MimePart::new("text/plain", text),
    };
    if env.attachments.is_empty() {
        b = b.body(content);
    } else {
        let mut parts = vec![content];
        for (i, raw) in env.attachments.iter().enumerate() {
            // RFC 2046 forbids base64 for message/rfc822: send it as is.
            parts.push(
                MimePart::new("message/rfc822", raw.as_slice())
                    .attachment(format!("message-{}.eml", i + 1))
                    .transfer_encoding("8bit"),
            );
        }
        b = b.body(MimePart::new("multipart/mixed", parts));
    }
    if let Some(irt) = env.in_reply_to.map(clean_id).filter(|s| !s.is_empty()) {
        b = b.in_reply_to(irt);
    }
    if !refs.is_empty() {
        b = b.references(refs);
    }
    b.write_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::parse;

    pub(super) fn env<'a>(subject: &'a str, name: &'a str) -> Envelope<'a> {
        Envelope {
            from_name: Some("Support"),
            from: "support@example.test",
            to_name: Some(name),
            to: "alice@example.org",
            subject,
            message_id: "c1.a1.xyz@example.test",
            in_reply_to: Some("orig@example.org"),
            references: vec!["root@example.org".into(), "orig@example.org".into()],
            auto_submitted: Some("auto-replied"),
            reply_to: None,
            attachments: vec![],
            instance: "support@example.test",
            case_id: 1,
            date: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            language: Some("de"),
            html: None,
        }
    }

    #[test]
    fn stamps_and_threading_headers() {
        let raw = compose(&env("[Case #1] Re: hi", "Alice"), "Hello\nthere").unwrap();
        let text = String::from_utf8(raw.clone()).unwrap();
        for h in [
            "Auto-Submitted: auto-replied",
            "X-Auto-Response-Suppress: All",
            "Precedence: bulk",
            "X-Escalator-Loop: support@example.test",
            "Message-ID: <c1.a1.xyz@example.test>",
            "In-Reply-To: <orig@example.org>",
        ] {
            assert!(text.contains(h), "missing {h} in\n{text}");
        }
        let m = parse(&raw);
        assert_eq!(m.subject, "[Case #1] Re: hi");
        assert_eq!(m.references, vec!["root@example.org", "orig@example.org"]);
        assert!(m.text.contains("Hello\r\nthere") || m.text.contains("Hello\nthere"));
    }

    #[test]
    fn encoded_line_breaks_in_customer_headers_add_no_header() {
        // A subject and name that decode to CR/LF + a header.
        let raw = b"From: =?utf-8?Q?Eve=0D=0ABcc:_victim@example.net?= <eve@example.org>\r\n\
Subject: =?utf-8?B?aGkNCkJjYzogdmljdGltQGV4YW1wbGUubmV0?=\r\n\r\nbody\r\n";
        let m = parse(raw);
        assert!(
            m.subject.contains('\n'),
            "the subject really decodes to a line break"
        );
        let name = m
            .from
            .as_ref()
            .and_then(|a| a.name.clone())
            .unwrap_or_default();
        let mut e = env(&m.subject, &name);
        e.to = "eve@example.org";
        let text = String::from_utf8(compose(&e, "ok").unwrap()).unwrap();
        assert!(
            !text
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
            "{text}"
        );
    }

    #[test]
    fn header_injection_is_impossible() {
        let raw = compose(
            &env("hi\r\nBcc: victim@example.net", "Eve\r\nX-Evil: 1"),
            "body",
        )
        .unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.lines().any(|l| l.starts_with("Bcc:")), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("X-Evil:")), "{text}");
        let mut e = env("x", "y");
        e.in_reply_to = Some("a@b>\r\nBcc: v@x.net");
        let text = String::from_utf8(compose(&e, "b").unwrap()).unwrap();
        assert!(!text.lines().any(|l| l.starts_with("Bcc:")), "{text}");
    }
}

#[cfg(test)]
mod attach_tests {
    use super::*;
    use crate::message::parse;

    #[test]
    fn originals_are_attached_as_message_rfc822_in_8bit() {
        let original = b"From: alice@example.org\r\nSubject: hi\r\nMessage-ID: <o@x>\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n".to_vec();
        let env = Envelope {
            from_name: None,
            from: "support@example.test",
            to_name: None,
            to: "tier2@example.test",
            subject: "[Case #1] Escalated to Tier 2: hi",
            message_id: "c1.f2.x@example.test",
            in_reply_to: None,
            references: vec![],
            auto_submitted: Some("auto-generated"),
            reply_to: Some("support@example.test"),
            attachments: vec![original.clone()],
            instance: "i",
            case_id: 1,
            date: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            language: Some("de"),
            html: None,
        };
        let raw = compose(&env, "summary").unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("Content-Type: message/rfc822"), "{text}");
        assert!(text.contains("Content-Transfer-Encoding: 8bit"), "{text}");
        assert!(
            text.contains("Reply-To: <support@example.test>")
                || text.contains("Reply-To: support@example.test"),
            "{text}"
        );
        let m = parse(&raw);
        assert!(m.text.contains("summary"));
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].content_type, "message/rfc822");
    }

    /// The language goes into one header, normalised; a tag carrying a
    /// line break or other junk adds no header at all.
    #[test]
    fn content_language_is_one_clean_header() {
        let raw = compose(&super::tests::env("s", "Alice"), "body\n").unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("\r\nContent-Language: de\r\n"), "{text}");
        let mut e = super::tests::env("s", "Alice");
        e.language = Some("de\r\nBcc: evil@example.org");
        let raw = compose(&e, "body\n").unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(
            !text.contains("Content-Language") && !text.contains("Bcc"),
            "{text}"
        );
        e.language = Some("PT_br");
        let text = String::from_utf8_lossy(&compose(&e, "b\n").unwrap()).to_string();
        assert!(text.contains("\r\nContent-Language: pt-br\r\n"), "{text}");
    }
}
