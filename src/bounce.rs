//! Bounces: reads a delivery-status notification (DSN) into the facts
//! ingest needs to match it to the mail escalator sent. Pure and total,
//! like [`crate::message::parse`]: any bytes give a report or None, never
//! a panic, and every loop is bounded whatever the sender wrote (a
//! stranger can forge a "bounce").
//!
//! Two forms are read:
//!
//! - the standard one (RFC 3464): `multipart/report;
//!   report-type=delivery-status`, whose `message/delivery-status` part
//!   has one block of fields per recipient (Final-Recipient, Action,
//!   Status, Diagnostic-Code) and whose `message/rfc822` or
//!   `text/rfc822-headers` part quotes the original;
//! - the common non-standard ones (Exim, qmail, older Exchange and
//!   Postfix notices): delivered with the null reverse path (the FIRST
//!   `Return-Path` field is `<>`: bounces are sent so) and with a bounce
//!   subject or `X-Failed-Recipients`, quoting the original's headers in
//!   the text or in an attached message. The sender's name is no sign:
//!   people write from `postmaster@` too, and a subject is words anyone
//!   may use, so a heuristic report is only ever a candidate. Its quoted
//!   IDs are only those of its quoted headers or attached message (never
//!   its own In-Reply-To/References: a vacation or a person's reply to
//!   our mail carries those too), and ingest threads one that matches
//!   nothing like any other mail.
//!
//! Matching the report to a case is not done here: the quoted Message-ID
//! is only a claim until ingest finds it among the mail escalator sent
//! (see `ingest/bounces.rs`).

use std::panic::{catch_unwind, AssertUnwindSafe};

use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde::{Deserialize, Serialize};

use crate::message::{header_fields, InboundMail};

/// Most recipients read from one report: a real DSN names the few
/// recipients one server handled; a forged one may list thousands.
pub const MAX_RECIPIENTS: usize = 100;
/// Most quoted Message-IDs tried: the original has one; a few more cover
/// a report quoting headers twice.
pub const MAX_ORIGINAL_IDS: usize = 4;
/// Most bytes of a delivery-status part or of a text read: the fields
/// of a hundred recipients fit many times over.
const MAX_SCAN: usize = 256 * 1024;
/// Most MIME parts looked at.
const MAX_PARTS: usize = 200;
/// Longest diagnostic text kept: it is shown to people, not parsed.
const MAX_DIAGNOSTIC: usize = 500;
/// Longest address or Message-ID accepted from a report.
const MAX_TOKEN: usize = 998;

/// How the report was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Form {
    /// `multipart/report; report-type=delivery-status` (RFC 3464).
    Standard,
    /// A robot's bounce in free text (subject, `X-Failed-Recipients`).
    Heuristic,
}

/// What became of the mail for one recipient (the DSN's `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Not delivered and no longer tried: a bounce.
    Failed,
    /// Not delivered yet, still being tried: a warning, not a bounce.
    Delayed,
    /// Delivered, relayed or expanded (a success notice): nothing to do.
    Delivered,
}

impl Action {
    fn parse(v: &str) -> Option<Action> {
        match v.trim().to_ascii_lowercase().as_str() {
            "failed" => Some(Action::Failed),
            "delayed" => Some(Action::Delayed),
            "delivered" | "relayed" | "expanded" => Some(Action::Delivered),
            _ => None,
        }
    }
}

/// One recipient the report speaks of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// Lower-case address the report names (`Final-Recipient`).
    pub address: String,
    /// The address as first given (`Original-Recipient`), when the report
    /// says: a forwarding server names its own target as final.
    pub original: Option<String>,
    pub action: Action,
    /// The status code, `5.1.1`; `5.0.0` (or `4.0.0`) when a free-text
    /// bounce gives none.
    pub status: String,
    /// The server's words (`Diagnostic-Code`, or the free text's line),
    /// kept for people, capped and without control characters.
    pub diagnostic: Option<String>,
}

impl Recipient {
    /// Does this recipient stand for `addr` (either of its addresses)?
    pub fn names(&self, addr: &str) -> bool {
        self.address.eq_ignore_ascii_case(addr)
            || self
                .original
                .as_deref()
                .is_some_and(|o| o.eq_ignore_ascii_case(addr))
    }
}

/// A delivery report, as the message claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub form: Form,
    /// At most [`MAX_RECIPIENTS`].
    pub recipients: Vec<Recipient>,
    /// Message-IDs of the original, without brackets, at most
    /// [`MAX_ORIGINAL_IDS`], in the order found.
    pub original_ids: Vec<String>,
}

/// Subjects of free-text bounces (lower-case, matched anywhere).
const FAILURE_SUBJECTS: &[&str] = &[
    "undelivered mail returned to sender",
    "undeliverable",
    "undelivered mail",
    "mail delivery failed",
    "mail delivery failure",
    "delivery status notification (failure)",
    "delivery failure",
    "delivery has failed",
    "failure notice",
    "returned mail",
    "non-delivery",
    "nondeliverable",
    "could not be delivered",
    "message not delivered",
];

/// Subjects of warnings that a mail is still being tried.
const DELAY_SUBJECTS: &[&str] = &[
    "delayed mail",
    "delivery status notification (delay)",
    "delivery delayed",
    "warning: message",
    "still being retried",
];

/// Reads `raw` (already parsed as `mail`) as a delivery report. None when
/// it is not one: the message then goes the ordinary way.
pub fn read(raw: &[u8], mail: &InboundMail) -> Option<Report> {
    let form = recognise(mail)?;
    // mail-parser has never been seen to panic; a bounce must not be
    // the first (the caller quarantines on a panic, but a report read
    // half-way is worse than none).
    let read = catch_unwind(AssertUnwindSafe(|| read_parts(raw, mail, form)));
    Some(read.unwrap_or(Report {
        form,
        recipients: Vec::new(),
        original_ids: Vec::new(),
    }))
}

/// Is this a delivery report, and of which form?
fn recognise(mail: &InboundMail) -> Option<Form> {
    let content_type = mail
        .headers
        .iter()
        .find(|(n, _)| n == "content-type")
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    let report = content_type.starts_with("multipart/report");
    if report && content_type.contains("delivery-status") {
        return Some(Form::Standard);
    }
    // The reverse path the delivering server recorded: a From of
    // `postmaster@` is a person as often as not, and a `Return-Path: <>`
    // below the first is the sender's own words.
    if mail.robot.reverse_path.as_deref() != Some("") {
        return None;
    }
    let subject = mail.subject.to_lowercase();
    let bounce_subject = FAILURE_SUBJECTS
        .iter()
        .chain(DELAY_SUBJECTS)
        .any(|s| subject.contains(s));
    (bounce_subject || mail.robot.failed_recipients).then_some(Form::Heuristic)
}

/// The report's recipients and quoted IDs, from its MIME parts (or, for
/// a free-text bounce, its text).
fn read_parts(raw: &[u8], mail: &InboundMail, form: Form) -> Report {
    let mut recipients = Vec::new();
    let mut ids = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    if let Some(msg) = MessageParser::default().parse(raw) {
        for part in msg.parts.iter().skip(1).take(MAX_PARTS) {
            let (ctype, subtype) = part
                .content_type()
                .map(|c| {
                    (
                        c.ctype().to_ascii_lowercase(),
                        c.subtype().unwrap_or("").to_ascii_lowercase(),
                    )
                })
                .unwrap_or_default();
            match (ctype.as_str(), subtype.as_str(), &part.body) {
                ("message", "delivery-status" | "global-delivery-status", _) => {
                    recipients.extend(status_fields(part.contents()));
                }
                (_, _, PartType::Message(inner)) => {
                    push_id(&mut ids, inner.message_id().unwrap_or(""));
                }
                ("text", "rfc822-headers", _) | ("message", "global-headers", _) => {
                    push_id(&mut ids, &quoted_header_id(part.contents()));
                }
                ("text", _, PartType::Text(t)) if texts.len() < 4 => {
                    texts.push(capped(t.as_bytes()));
                }
                _ => {}
            }
        }
        if msg.parts.len() <= 1 {
            // A single-part message: its body is the text.
            texts.push(capped(msg.root_part().contents()));
        }
    }
    if ids.is_empty() {
        for t in &texts {
            for id in inline_ids(t) {
                push_id(&mut ids, &id);
            }
        }
    }
    if ids.is_empty() && form == Form::Standard {
        // Some servers (Gmail) also refer to the original in the report's
        // own headers. Only for a standard report: a vacation notice or a
        // person's reply to our mail refers to it the same way, and the
        // free-text form cannot tell them from a bounce.
        for id in mail.in_reply_to.iter().chain(mail.references.iter().rev()) {
            push_id(&mut ids, id);
        }
    }
    if recipients.is_empty() {
        recipients = free_text_recipients(mail, &texts);
    }
    recipients.truncate(MAX_RECIPIENTS);
    Report {
        form,
        recipients,
        original_ids: ids,
    }
}

/// At most [`MAX_SCAN`] bytes as text (lossy: reports are not always
/// UTF-8, and a broken byte must not hide the fields around it).
fn capped(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_SCAN)]).into_owned()
}

fn push_id(ids: &mut Vec<String>, id: &str) {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    if id.is_empty() || id.len() > MAX_TOKEN || ids.len() >= MAX_ORIGINAL_IDS {
        return;
    }
    if !ids.iter().any(|i| i == id) {
        ids.push(id.to_string());
    }
}

/// The Message-ID in a block of quoted headers.
fn quoted_header_id(b: &[u8]) -> String {
    let head = &b[..b.len().min(MAX_SCAN)];
    header_fields(head)
        .take(500)
        .find(|(n, _)| n == "message-id")
        .map(|(_, v)| first_bracketed(&v).unwrap_or(v))
        .unwrap_or_default()
}

/// `<x>` of a field's value, when it has brackets.
fn first_bracketed(v: &str) -> Option<String> {
    let start = v.find('<')?;
    let end = start + v[start..].find('>')?;
    Some(v[start + 1..end].to_string())
}

/// The recipients of a `message/delivery-status` body: blocks of fields
/// separated by blank lines; those naming a recipient count.
fn status_fields(body: &[u8]) -> Vec<Recipient> {
    let text = capped(body);
    let mut out = Vec::new();
    let mut block: Vec<(String, String)> = Vec::new();
    let mut lines = text.lines().take(20_000).peekable();
    while lines.peek().is_some() || !block.is_empty() {
        let line = lines.next();
        match line {
            Some(l) if l.starts_with([' ', '\t']) => {
                if let Some(last) = block.last_mut() {
                    if last.1.len() < MAX_SCAN / 16 {
                        last.1.push(' ');
                        last.1.push_str(l.trim());
                    }
                }
            }
            Some(l) if !l.trim().is_empty() => {
                if let Some((n, v)) = l.split_once(':') {
                    block.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            _ => {
                if let Some(r) = recipient_of(&block) {
                    if out.len() < MAX_RECIPIENTS {
                        out.push(r);
                    }
                }
                block.clear();
            }
        }
    }
    out
}

/// One per-recipient block of a DSN as a [`Recipient`]; None without an
/// address or a known action.
fn recipient_of(block: &[(String, String)]) -> Option<Recipient> {
    let field = |name: &str| {
        block
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let address = |v: &str| {
        // `rfc822; someone@example.org` (the type is optional in practice).
        let a = v.rsplit_once(';').map(|(_, a)| a).unwrap_or(v);
        plausible_address(a.trim())
    };
    let original = field("original-recipient").and_then(address);
    let final_ = field("final-recipient").and_then(address);
    let action = Action::parse(field("action")?)?;
    let status = field("status")
        .and_then(|s| s.split_whitespace().next())
        .filter(|s| is_status(s))
        .map(str::to_string)
        .unwrap_or_else(|| default_status(action).into());
    Some(Recipient {
        address: final_.or_else(|| original.clone())?,
        original,
        action,
        status,
        diagnostic: field("diagnostic-code").map(clean),
    })
}

/// `5.1.1`: class 2, 4 or 5, then two numbers.
fn is_status(s: &str) -> bool {
    let mut parts = s.split('.');
    let class = parts.next().unwrap_or("");
    let (a, b) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    matches!(class, "2" | "4" | "5")
        && parts.next().is_none()
        && [a, b]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit()))
}

fn default_status(action: Action) -> &'static str {
    match action {
        Action::Failed => "5.0.0",
        Action::Delayed => "4.0.0",
        Action::Delivered => "2.0.0",
    }
}

/// A server's words for people: one line, printable, capped.
fn clean(s: &str) -> String {
    let one: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let one = one.split_whitespace().collect::<Vec<_>>().join(" ");
    one.chars().take(MAX_DIAGNOSTIC).collect()
}

/// Message-IDs quoted as header lines in a text (`Message-ID: <x>`,
/// possibly indented or quoted with `>`), for bounces that paste the
/// original's headers into their text.
fn inline_ids(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines().take(20_000).peekable();
    while let Some(line) = lines.next() {
        let l = line.trim_start_matches([' ', '\t', '>']);
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        if !name.eq_ignore_ascii_case("message-id") {
            continue;
        }
        let mut value = value.trim().to_string();
        if value.is_empty() {
            // Folded: the ID is on the next line.
            value = lines
                .peek()
                .map(|l| l.trim().to_string())
                .unwrap_or_default();
        }
        if let Some(id) = first_bracketed(&value) {
            out.push(id);
            if out.len() >= MAX_ORIGINAL_IDS {
                break;
            }
        }
    }
    out
}

/// The recipients a free-text bounce names: `X-Failed-Recipients`, else
/// the addresses in its explanation (the text before the quoted
/// original's headers, which name the sender too).
fn free_text_recipients(mail: &InboundMail, texts: &[String]) -> Vec<Recipient> {
    let subject = mail.subject.to_lowercase();
    let action = if DELAY_SUBJECTS.iter().any(|s| subject.contains(s)) {
        Action::Delayed
    } else {
        Action::Failed
    };
    let explanation: String = texts
        .first()
        .map(|t| explanation(t))
        .unwrap_or_else(|| explanation(&mail.text));
    let mut addrs: Vec<String> = mail
        .headers
        .iter()
        .filter(|(n, _)| n == "x-failed-recipients")
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|a| bare_address(&a))
        .collect();
    if addrs.is_empty() {
        addrs = explanation
            .split(|c: char| c.is_whitespace() || "<>()[]\"',;".contains(c))
            .filter_map(|w| bare_address(w.trim_end_matches([':', '.'])))
            .collect();
    }
    let mut out: Vec<Recipient> = Vec::new();
    for a in addrs {
        if out.len() >= MAX_RECIPIENTS {
            break;
        }
        if out.iter().any(|r| r.address == a) {
            continue;
        }
        // The server's words: the explanation's line naming the address.
        let line = explanation.lines().find(|l| l.to_lowercase().contains(&a));
        let status = explanation
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .map(|w| w.trim_matches('.'))
            .find(|w| {
                is_status(w) && w.starts_with(if action == Action::Failed { '5' } else { '4' })
            })
            .map(str::to_string)
            .unwrap_or_else(|| default_status(action).into());
        out.push(Recipient {
            address: a,
            original: None,
            action,
            status,
            diagnostic: line.map(clean).filter(|l| !l.is_empty()),
        });
    }
    out
}

/// The text up to the first line that starts quoted headers.
fn explanation(text: &str) -> String {
    const STARTS: &[&str] = &[
        "received:",
        "return-path:",
        "message-id:",
        "dkim-signature:",
        "mime-version:",
        "from:",
        "date:",
    ];
    let mut out = String::new();
    for line in text.lines().take(2_000) {
        let l = line
            .trim_start_matches([' ', '\t', '>'])
            .to_ascii_lowercase();
        if STARTS.iter().any(|s| l.starts_with(s)) {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A word that is an address (`local@domain.tld`), lower-cased.
fn bare_address(w: &str) -> Option<String> {
    plausible_address(w.trim()).filter(|a| a.is_ascii() && a.contains('.'))
}

/// An address a report names (`<local@domain>`), lower-cased; None for
/// anything that cannot be one. It ends up in logs and events, so no
/// control character (a forged `\r\n` or terminal escape), no space, no
/// bracket or separator gets through; UTF-8 is kept (SMTPUTF8 reports).
fn plausible_address(a: &str) -> Option<String> {
    let a = a.strip_prefix('<').unwrap_or(a);
    let a = a.strip_suffix('>').unwrap_or(a).trim();
    let (local, domain) = a.rsplit_once('@')?;
    let ok = !local.is_empty()
        && !domain.is_empty()
        && a.len() <= MAX_TOKEN
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !a
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>()[],;:\\\"".contains(c))
        && !local.contains('@');
    ok.then(|| a.to_lowercase())
}

#[cfg(test)]
mod tests;
