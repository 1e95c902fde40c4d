//! Parse: raw bytes from the mailbox → `InboundMail`, the facts the rest
//! of the pipeline needs. Pure, and total: any byte string gives an
//! `InboundMail` (a message mail-parser cannot read still has a size, a
//! hash and a derived Message-ID), because a message we cannot parse must
//! still end up in a case rather than be dropped.

use std::panic::{catch_unwind, AssertUnwindSafe};

use chrono::{DateTime, TimeZone, Utc};
use mail_parser::{MessageParser, MimeHeaders};
use serde::{Deserialize, Serialize};

/// One address from a header, lower-cased so comparisons are exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addr {
    pub name: Option<String>,
    pub email: String,
}

/// An attachment's name, type and size: listed to staff, kept in the raw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub name: Option<String>,
    pub content_type: String,
    pub size: usize,
}

/// The header facts that decide whether a message may be answered
/// automatically (RFC 3834 and the de-facto headers robots use).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotHeaders {
    pub auto_submitted: Option<String>,
    pub precedence: Option<String>,
    pub x_autoreply: bool,
    pub list: bool,
    /// The last `Return-Path` field; `Some("")` is the null reverse path
    /// `<>` of bounces. Only for suppressing automatic answers, where a
    /// false `<>` costs nothing (see [`RobotHeaders::reverse_path`]).
    pub return_path: Option<String>,
    /// The FIRST `Return-Path` field: the envelope sender the delivering
    /// server recorded (it prepends the field). Fields further down came
    /// with the message and anyone can write them, so only this one says
    /// whether the mail really had the null reverse path `<>`.
    #[serde(default)]
    pub reverse_path: Option<String>,
    pub failed_recipients: bool,
    pub delivery_report: bool,
    pub auto_response_suppress: Option<String>,
    /// The value of our own loop header, if some escalator sent this.
    pub loop_header: Option<String>,
}

/// A parsed inbound message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMail {
    /// Without angle brackets, as mail-parser gives it.
    pub message_id: String,
    /// True when the message had none and we derived it from the hash.
    pub message_id_derived: bool,
    pub in_reply_to: Vec<String>,
    pub references: Vec<String>,
    pub subject: String,
    pub from: Option<Addr>,
    pub to: Vec<Addr>,
    pub cc: Vec<Addr>,
    pub date: Option<DateTime<Utc>>,
    /// The text body (HTML rendered to text when there is no text part).
    pub text: String,
    /// With only an HTML body: the new text of it, quote containers cut
    /// before it became text (see [`crate::quote::html_new_text`]).
    #[serde(default)]
    pub html_reply: Option<String>,
    pub attachments: Vec<Attachment>,
    pub robot: RobotHeaders,
    /// Hash of the message without trace headers: the same message
    /// delivered again (new Received lines) hashes the same.
    pub content_hash: String,
    pub size: usize,
    /// Why the MIME structure could not be read, when it could not.
    pub parse_error: Option<String>,
    /// Top-level header fields (lower-case names), for triggers and
    /// Authentication-Results; capped in number.
    pub headers: Vec<(String, String)>,
    /// How many `From:` fields the message had. The first one is `from`
    /// (the one DMARC checks); more than one is a sign of forgery.
    #[serde(default)]
    pub from_fields: usize,
}

/// The name of the loop header every escalator instance stamps.
pub const LOOP_HEADER: &str = "X-Escalator-Loop";

/// Trace headers added in transit; left out of the content hash.
const TRACE: &[&str] = &[
    "received",
    "return-path",
    "delivered-to",
    "x-original-to",
    "x-delivered-to",
    "authentication-results",
    "arc-seal",
    "arc-message-signature",
    "arc-authentication-results",
    "received-spf",
    "x-spam-status",
    "x-spam-score",
    "x-spam-flag",
    "status",
    "x-status",
    "x-uid",
    "x-keywords",
    "content-length",
    "lines",
];

/// Longest text body we keep parsed (the raw message keeps everything).
const MAX_TEXT: usize = 256 * 1024;
/// Most references kept: threading needs the recent ones, and a header
/// with thousands must not make every lookup slow.
const MAX_REFERENCES: usize = 64;
/// In-Reply-To names the one message answered; a few more are tolerated.
const MAX_IN_REPLY_TO: usize = 8;
/// Most header fields read from one message, most To/Cc addresses and
/// most attachments listed: every loop over a message's parts is bounded
/// by a constant, whatever the sender wrote.
const MAX_FIELDS: usize = 200;
const MAX_ADDRESSES: usize = 100;
const MAX_ATTACHMENTS: usize = 500;

/// Parses raw bytes; never panics (mail-parser runs under catch_unwind).
pub fn parse(raw: &[u8]) -> InboundMail {
    let content_hash = content_hash(raw);
    let robot = robot_headers(raw);
    let parsed = catch_unwind(AssertUnwindSafe(|| parse_mime(raw)));
    let (mut mail, parse_error) = match parsed {
        Ok(Some(m)) => (m, None),
        Ok(None) => (empty(), Some("no MIME structure could be read".to_string())),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (empty(), Some(format!("the MIME parser panicked: {what}")))
        }
    };
    if mail.message_id.is_empty() {
        mail.message_id = format!("{}@derived.escalator.invalid", &content_hash[..32]);
        mail.message_id_derived = true;
    }
    mail.robot = robot;
    mail.headers = header_fields(raw).take(MAX_FIELDS).collect();
    mail.content_hash = content_hash;
    mail.size = raw.len();
    mail.parse_error = parse_error;
    mail
}

fn empty() -> InboundMail {
    InboundMail {
        message_id: String::new(),
        message_id_derived: false,
        in_reply_to: Vec::new(),
        references: Vec::new(),
        subject: String::new(),
        from: None,
        to: Vec::new(),
        cc: Vec::new(),
        date: None,
        text: String::new(),
        html_reply: None,
        attachments: Vec::new(),
        robot: RobotHeaders::default(),
        content_hash: String::new(),
        size: 0,
        parse_error: None,
        headers: Vec::new(),
        from_fields: 0,
    }
}

// Long: one pass over mail-parser's result filling each field of InboundMail in turn; split, the fields would travel through helpers as a dozen arguments.
fn parse_mime(raw: &[u8]) -> Option<InboundMail> {
    if raw.is_empty() {
        return None;
    }
    let msg = MessageParser::default().parse(raw)?;
    let addrs = |a: Option<&mail_parser::Address>| -> Vec<Addr> {
        a.map(|a| a.iter().filter_map(addr).take(MAX_ADDRESSES).collect())
            .unwrap_or_default()
    };
    // The first From, as DMARC verifiers read it (mail-parser keeps the
    // last of several).
    let from_headers: Vec<&mail_parser::Header> = msg
        .headers()
        .iter()
        .filter(|h| matches!(h.name, mail_parser::HeaderName::From))
        .collect();
    let from = from_headers
        .first()
        .and_then(|h| h.value.as_address())
        .and_then(|a| a.first())
        .and_then(addr);
    let ids = |v: &mail_parser::HeaderValue| -> Vec<String> {
        let mut out: Vec<String> = match v {
            mail_parser::HeaderValue::Text(t) => vec![t.to_string()],
            mail_parser::HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
            _ => Vec::new(),
        };
        out.retain(|id| !id.is_empty() && id.len() < 1000);
        out
    };
    let mut references = ids(msg.references());
    if references.len() > MAX_REFERENCES {
        // Keep the thread's root and the most recent ones.
        let tail = references.split_off(references.len() - (MAX_REFERENCES - 1));
        references.truncate(1);
        references.extend(tail);
    }
    let mut text = msg.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
    if text.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[... truncated; the original is attached to forwards]");
    }
    let html_only = msg
        .text_body
        .first()
        .and_then(|id| msg.part(*id))
        .is_some_and(|p| matches!(p.body, mail_parser::PartType::Html(_)));
    let html_reply = if html_only {
        msg.body_html(0).map(|h| {
            let mut h = h.into_owned();
            if h.len() > MAX_TEXT {
                let mut cut = MAX_TEXT;
                while !h.is_char_boundary(cut) {
                    cut -= 1;
                }
                h.truncate(cut);
            }
            crate::quote::html_new_text(&h)
        })
    } else {
        None
    };
    let attachments = msg
        .attachments()
        .take(MAX_ATTACHMENTS)
        .map(|p| Attachment {
            name: p.attachment_name().map(str::to_string),
            content_type: p
                .content_type()
                .map(|c| match c.subtype() {
                    Some(s) => format!("{}/{}", c.ctype(), s),
                    None => c.ctype().to_string(),
                })
                .unwrap_or_else(|| "application/octet-stream".into())
                .to_lowercase(),
            size: p.len(),
        })
        .collect();
    let message_id = msg
        .message_id()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.len() < 1000)
        .unwrap_or_default();
    Some(InboundMail {
        message_id,
        message_id_derived: false,
        in_reply_to: {
            let mut v = ids(msg.in_reply_to());
            v.truncate(MAX_IN_REPLY_TO);
            v
        },
        references,
        subject: msg
            .subject()
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        from,
        to: addrs(msg.to()),
        cc: addrs(msg.cc()),
        date: msg
            .date()
            .and_then(|d| Utc.timestamp_opt(d.to_timestamp(), 0).single()),
        text,
        html_reply,
        attachments,
        robot: RobotHeaders::default(),
        content_hash: String::new(),
        size: 0,
        parse_error: None,
        headers: Vec::new(),
        from_fields: from_headers.len(),
    })
}

/// One address, lower-cased; None without a local part and a domain.
fn addr(x: &mail_parser::Addr) -> Option<Addr> {
    let mut name = x
        .name()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty());
    let mut email = x.address()?.trim().to_lowercase();
    if email.starts_with('@') {
        // `"x"@example.org` without angle brackets: mail-parser reads the
        // quoted local part as a display name. It is the local part.
        let local = name.take()?;
        email = if local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c))
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
        {
            format!("{}{email}", local.to_lowercase())
        } else {
            let quoted = local.replace('\\', "\\\\").replace('"', "\\\"");
            format!("\"{}\"{email}", quoted.to_lowercase())
        };
    }
    let (local, domain) = email.rsplit_once('@')?;
    (!local.is_empty() && !domain.is_empty()).then_some(Addr { name, email })
}

/// Iterates the top-level header fields as (lower-case name, unfolded
/// value), straight from the bytes: works when MIME parsing does not.
pub fn header_fields(raw: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    let head = header_block(raw);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(String::from_utf8_lossy(line).trim());
            }
            continue;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&line[..colon])
                .trim()
                .to_ascii_lowercase();
            let value = String::from_utf8_lossy(&line[colon + 1..])
                .trim()
                .to_string();
            fields.push((name, value));
        }
    }
    fields.into_iter()
}

fn header_block(raw: &[u8]) -> &[u8] {
    let end = find(raw, b"\r\n\r\n")
        .or_else(|| find(raw, b"\n\n"))
        .unwrap_or(raw.len());
    &raw[..end]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn robot_headers(raw: &[u8]) -> RobotHeaders {
    let mut r = RobotHeaders::default();
    for (name, value) in header_fields(raw).take(MAX_FIELDS) {
        let v = value.to_ascii_lowercase();
        match name.as_str() {
            "auto-submitted" => r.auto_submitted = Some(v),
            "precedence" => r.precedence = Some(v),
            "x-autoreply" | "x-autorespond" | "x-autoresponder" => r.x_autoreply = true,
            "list-id" | "list-unsubscribe" | "list-post" => r.list = true,
            "return-path" => {
                let addr = v
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .trim();
                if r.reverse_path.is_none() {
                    r.reverse_path = Some(addr.to_string());
                }
                r.return_path = Some(addr.to_string());
            }
            "x-failed-recipients" => r.failed_recipients = true,
            "x-auto-response-suppress" => r.auto_response_suppress = Some(v),
            "content-type"
                if v.starts_with("multipart/report")
                    || v.starts_with("message/delivery-status") =>
            {
                r.delivery_report = true;
            }
            n if n.eq_ignore_ascii_case(LOOP_HEADER) => r.loop_header = Some(value),
            _ => {}
        }
    }
    r
}

/// Hashes the message minus its trace headers.
pub fn content_hash(raw: &[u8]) -> String {
    let head_end = header_block(raw).len();
    let mut h = blake3::Hasher::new();
    let head = &raw[..head_end];
    let mut skipping = false;
    for line in head.split_inclusive(|&b| b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            let name_end = line.iter().position(|&b| b == b':').unwrap_or(0);
            let name = String::from_utf8_lossy(&line[..name_end]).to_ascii_lowercase();
            skipping = TRACE.contains(&name.trim());
        }
        if !skipping {
            h.update(line);
        }
    }
    h.update(&raw[head_end..]);
    h.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &[u8] = b"Return-Path: <alice@example.org>\r\n\
Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
From: Alice Example <Alice@Example.org>\r\n\
To: support@example.test\r\n\
Cc: Bob <bob@example.org>\r\n\
Subject: Printer on fire\r\n\
Message-ID: <abc@example.org>\r\n\
In-Reply-To: <prev@example.org>\r\n\
References: <root@example.org> <prev@example.org>\r\n\
Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\
\r\n\
It is on fire.\r\n";

    #[test]
    fn parses_the_basics() {
        let m = parse(SIMPLE);
        assert_eq!(m.message_id, "abc@example.org");
        assert!(!m.message_id_derived);
        assert_eq!(m.in_reply_to, vec!["prev@example.org"]);
        assert_eq!(m.references, vec!["root@example.org", "prev@example.org"]);
        assert_eq!(m.subject, "Printer on fire");
        let from = m.from.unwrap();
        assert_eq!(from.email, "alice@example.org");
        assert_eq!(from.name.as_deref(), Some("Alice Example"));
        assert_eq!(m.cc[0].email, "bob@example.org");
        assert!(m.text.contains("on fire"));
        assert_eq!(m.robot.return_path.as_deref(), Some("alice@example.org"));
        assert_eq!(m.date.unwrap().to_rfc3339(), "2024-01-01T10:00:00+00:00");
        assert!(m.parse_error.is_none());
    }

    #[test]
    fn hash_ignores_trace_headers() {
        let mut again = b"Received: from z by w; Tue, 2 Jan 2024 00:00:00 +0000\r\n\
Delivered-To: other@example.test\r\n"
            .to_vec();
        again.extend_from_slice(SIMPLE);
        assert_eq!(content_hash(SIMPLE), content_hash(&again));
        let changed = String::from_utf8_lossy(SIMPLE).replace("on fire.", "fine.");
        assert_ne!(content_hash(SIMPLE), content_hash(changed.as_bytes()));
    }

    #[test]
    fn missing_message_id_is_derived_stably() {
        let raw = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n";
        let a = parse(raw);
        let b = parse(raw);
        assert!(a.message_id_derived);
        assert_eq!(a.message_id, b.message_id);
        assert!(a.message_id.ends_with("@derived.escalator.invalid"));
    }

    #[test]
    fn empty_and_header_only_messages_still_parse() {
        let e = parse(b"");
        assert_eq!(e.size, 0);
        assert!(e.parse_error.is_some());
        assert!(e.message_id_derived);
        let h = parse(b"From: a@example.org\r\nSubject: only headers\r\n");
        assert_eq!(h.subject, "only headers");
    }

    #[test]
    fn html_only_mail_gives_text() {
        let raw =
            b"From: a@example.org\r\nContent-Type: text/html\r\n\r\n<p>Hello <b>there</b></p>\r\n";
        let m = parse(raw);
        assert!(m.text.contains("Hello"), "{:?}", m.text);
        assert!(!m.text.contains("<b>"), "{:?}", m.text);
    }

    #[test]
    fn robot_headers_are_read() {
        let raw = b"From: MAILER-DAEMON@example.org\r\nReturn-Path: <>\r\n\
Auto-Submitted: auto-replied\r\nPrecedence: Bulk\r\nList-Id: <x.example.org>\r\n\
X-Escalator-Loop: support@other.test\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x--\r\n";
        let r = parse(raw).robot;
        assert_eq!(r.return_path.as_deref(), Some(""));
        assert_eq!(r.auto_submitted.as_deref(), Some("auto-replied"));
        assert_eq!(r.precedence.as_deref(), Some("bulk"));
        assert!(r.list && r.delivery_report);
        assert_eq!(r.loop_header.as_deref(), Some("support@other.test"));
    }

    #[test]
    fn the_reverse_path_is_the_first_return_path() {
        // The delivering server prepends the real one; a `<>` the sender
        // wrote lower down must not make the mail a bounce.
        let raw = b"Return-Path: <postmaster@customer.example>\r\n\
Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\nReturn-Path: <>\r\n\
From: postmaster@customer.example\r\nSubject: hi\r\n\r\nhi\r\n";
        let r = parse(raw).robot;
        assert_eq!(
            r.reverse_path.as_deref(),
            Some("postmaster@customer.example")
        );
        // Automatic answers stay suppressed by either: no loop risk taken.
        assert_eq!(r.return_path.as_deref(), Some(""));
        let r = parse(b"Return-Path: <>\r\nReturn-Path: <a@example.org>\r\n\r\nx").robot;
        assert_eq!(r.reverse_path.as_deref(), Some(""));
    }

    #[test]
    fn two_from_headers_take_the_first_and_are_counted() {
        // Attack: a second From after the one DMARC verified, hoping the
        // gateway reads the last (mail-parser's choice) and trusts it.
        let m =
            parse(b"From: first@example.org\r\nFrom: ceo@staff.example\r\nSubject: x\r\n\r\nb\r\n");
        assert_eq!(m.from.unwrap().email, "first@example.org");
        assert_eq!(m.from_fields, 2);
        assert_eq!(parse(SIMPLE).from_fields, 1);
    }

    #[test]
    fn a_quoted_local_part_keeps_its_local_part() {
        // Input: `"x"@example.org` became `@example.org`, an address
        // nobody has, shared by every such sender.
        let m = parse(b"From: \"x\"@example.org\r\n\r\nb\r\n");
        assert_eq!(m.from.unwrap().email, "x@example.org");
        let m = parse(b"From: \"John Doe\"@Example.org\r\n\r\nb\r\n");
        assert_eq!(m.from.unwrap().email, "\"john doe\"@example.org");
        let m = parse(b"From: Name <\"x y\"@example.org>\r\n\r\nb\r\n");
        assert_eq!(m.from.unwrap().email, "\"x y\"@example.org");
        let m = parse(b"From: @example.org\r\n\r\nb\r\n");
        assert_eq!(m.from, None, "no local part: no sender");
    }

    #[test]
    fn a_huge_in_reply_to_is_capped() {
        // Attack: an In-Reply-To of 200,000 IDs (4.7 MB), each looked up
        // one by one under the store's write lock.
        let mut raw = String::from("From: a@example.org\r\nIn-Reply-To:");
        for i in 0..200_000 {
            raw.push_str(&format!(" <r{i}@example.org>\r\n"));
        }
        raw.push_str("To:");
        for i in 0..5_000 {
            raw.push_str(&format!(" u{i}@example.org,\r\n"));
        }
        raw.push_str(" last@example.org\r\n\r\nbody\r\n");
        let m = parse(raw.as_bytes());
        assert_eq!(m.in_reply_to.len(), MAX_IN_REPLY_TO);
        assert_eq!(m.in_reply_to[0], "r0@example.org");
        assert_eq!(m.to.len(), MAX_ADDRESSES);
        assert!(m.headers.len() <= MAX_FIELDS);
    }

    #[test]
    fn huge_references_are_capped() {
        let mut raw = String::from("From: a@example.org\r\nReferences:");
        for i in 0..5000 {
            raw.push_str(&format!(" <r{i}@example.org>\r\n"));
        }
        raw.push_str("\r\nbody\r\n");
        let m = parse(raw.as_bytes());
        assert_eq!(m.references.len(), MAX_REFERENCES);
        assert_eq!(m.references[0], "r0@example.org");
        assert_eq!(m.references.last().unwrap(), "r4999@example.org");
    }

    #[test]
    fn corpus_never_panics() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
        let Ok(dirs) = std::fs::read_dir(&root) else {
            return; // the corpus is optional on a developer's machine
        };
        let mut n = 0;
        let mut stack: Vec<_> = dirs.flatten().map(|e| e.path()).collect();
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
            } else if p.extension().is_some_and(|e| e == "eml") {
                let m = parse(&std::fs::read(&p).unwrap());
                assert!(!m.message_id.is_empty(), "{}", p.display());
                n += 1;
            }
        }
        assert!(n > 0);
    }
}
