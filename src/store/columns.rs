//! The PostgreSQL tables' columns for people: each key space's table
//! holds the engine's `key` and `value` and, beside them, the record's
//! fields as typed columns (`migrations/postgres/0003_tables.sql`), which
//! a team queries and the daemon never reads. This module says which
//! columns each table has and works out their values from a row's key
//! and value when the row is written.
//!
//! Values go to the database as text and are cast there to the column's
//! type (the write statement names it): one array per column whatever
//! its type, and a time is RFC 3339, which PostgreSQL reads the same
//! under any session setting.

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::de::DeserializeOwned;

use super::codec::{self, read_u64, Tree};
use crate::case::{Case, Reason};
use crate::record::{Cursor, MessageRecord, OutboxEntry, QuarantineEntry};
use crate::stats::{Facts, Stint};

/// A column: its name and SQL type.
pub(super) type Column = (&'static str, &'static str);

/// The typed columns of a key space's table, after `key` and `value`.
// Long: one list per table, side by side with 0003_tables.sql; split, the contract would be read in pieces.
pub(super) fn of(t: Tree) -> &'static [Column] {
    match t {
        Tree::Meta => &[("name", "text")],
        Tree::Cases => &[
            ("id", "bigint"),
            ("queue", "text"),
            ("customer", "text"),
            ("customer_name", "text"),
            ("subject", "text"),
            ("status", "text"),
            ("tier", "text"),
            ("priority", "text"),
            ("opened_at", "timestamptz"),
            ("updated_at", "timestamptz"),
            ("deadline", "timestamptz"),
            ("next_timer_at", "timestamptz"),
            ("timer_kind", "text"),
            ("first_response_at", "timestamptz"),
            ("answered_at", "timestamptz"),
            ("resolved_at", "timestamptz"),
            ("escalations", "bigint"),
            ("breached", "boolean"),
            ("repeat_customer", "boolean"),
            ("csat", "smallint"),
            ("message_count", "bigint"),
            ("previous_case", "bigint"),
            ("language", "text"),
        ],
        Tree::Messages => &[
            ("seq", "bigint"),
            ("case_id", "bigint"),
            ("message_id", "text"),
            ("from_address", "text"),
            ("from_name", "text"),
            ("subject", "text"),
            ("date", "timestamptz"),
            ("received_at", "timestamptz"),
            ("folder", "text"),
            ("uid", "bigint"),
            ("size", "bigint"),
            ("truncated", "boolean"),
            ("suppressed", "text"),
        ],
        Tree::Raw => &[
            ("message_seq", "bigint"),
            ("outbox_id", "bigint"),
            ("size", "bigint"),
        ],
        Tree::MessageIds => &[
            ("message_id", "text"),
            ("content_hash", "text"),
            ("case_id", "bigint"),
            ("message_seq", "bigint"),
        ],
        Tree::Cursors => &[
            ("queue", "text"),
            ("folder", "text"),
            ("uid_validity", "bigint"),
            ("last_uid", "bigint"),
        ],
        Tree::Outbox => &[
            ("id", "bigint"),
            ("case_id", "bigint"),
            ("kind", "text"),
            ("message_id", "text"),
            ("from_address", "text"),
            ("recipients", "text"),
            ("subject", "text"),
            ("state", "text"),
            ("attempts", "bigint"),
            ("created_at", "timestamptz"),
            ("next_attempt_at", "timestamptz"),
            ("attempt_at", "timestamptz"),
            ("sent_at", "timestamptz"),
            ("last_error", "text"),
            ("claimed_by", "text"),
        ],
        Tree::Quarantine => &[
            ("id", "bigint"),
            ("part", "text"),
            ("queue", "text"),
            ("folder", "text"),
            ("uid_validity", "bigint"),
            ("uid", "bigint"),
            ("error", "text"),
            ("at", "timestamptz"),
            ("attempts", "bigint"),
        ],
        Tree::Customers => &[("customer", "text"), ("case_id", "bigint")],
        Tree::AutoReplies => &[
            ("recipient", "text"),
            ("sent_at", "timestamptz"),
            ("outbox_id", "bigint"),
        ],
        Tree::Deadlines => &[("at", "timestamptz"), ("case_id", "bigint")],
        Tree::OutboxPending => &[("outbox_id", "bigint")],
        Tree::Facts => &[
            ("case_id", "bigint"),
            ("queue", "text"),
            ("tier", "text"),
            ("status", "text"),
            ("opened_at", "timestamptz"),
            ("first_response_at", "timestamptz"),
            ("resolved_at", "timestamptz"),
            ("first_response_secs", "bigint"),
            ("resolve_secs", "bigint"),
            ("escalated", "boolean"),
            ("escalated_stale", "boolean"),
            ("escalated_repeat_customer", "boolean"),
            ("escalated_trigger", "boolean"),
            ("escalated_manual", "boolean"),
            ("breached", "boolean"),
            ("repeat_customer", "boolean"),
            ("csat", "smallint"),
            ("bounces", "bigint"),
            ("stint_tier", "text[]"),
            ("stint_entered_at", "timestamptz[]"),
            ("stint_first_response_at", "timestamptz[]"),
            ("stint_first_response_secs", "bigint[]"),
            ("stint_left_at", "timestamptz[]"),
            ("stint_left_reason", "text[]"),
            ("stint_deadline_missed", "boolean[]"),
            ("triggers", "text[]"),
        ],
        Tree::MessageCases | Tree::Referrers => &[("message_id", "text"), ("case_id", "bigint")],
        Tree::History => &[("case_id", "bigint"), ("first_event", "bigint")],
        Tree::CaseMessages => &[
            ("case_id", "bigint"),
            ("position", "bigint"),
            ("message_seq", "bigint"),
        ],
    }
}

type Cells = Vec<Option<String>>;

/// The typed columns' values of a row, in [`of`]'s order. A record that
/// does not decode (never one the daemon wrote) leaves them empty: the
/// row itself is what the daemon reads, and it is kept as given.
pub(super) fn project(t: Tree, key: &[u8], value: &[u8]) -> Cells {
    let n = of(t).len();
    let mut cells = project_known(t, key, value).unwrap_or_default();
    cells.resize(n, None);
    cells
}

fn project_known(t: Tree, key: &[u8], value: &[u8]) -> Option<Cells> {
    Some(match t {
        Tree::Meta => vec![text(&String::from_utf8_lossy(key))],
        Tree::Cases => case(&record::<Case>(t, key, value)?),
        Tree::Messages => message(&record::<MessageRecord>(t, key, value)?),
        Tree::Raw => {
            let size = num(value.len() as u64);
            match key.strip_prefix(b"out") {
                Some(id) => vec![None, read_u64(id).and_then(num), size],
                None => vec![read_u64(key).and_then(num), None, size],
            }
        }
        Tree::MessageIds => {
            let (id, suffix) = split_text_key(key, None)?;
            vec![
                id,
                text(&String::from_utf8_lossy(suffix)),
                value.get(..8).and_then(read_u64).and_then(num),
                value.get(8..16).and_then(read_u64).and_then(num),
            ]
        }
        Tree::Cursors => {
            let c = record::<Cursor>(t, key, value)?;
            let k = String::from_utf8_lossy(key);
            let (queue, folder) = match k.split_once('\0') {
                Some((q, f)) => (q.to_string(), f.to_string()),
                None => (crate::case::DEFAULT_QUEUE.to_string(), k.into_owned()),
            };
            vec![
                Some(queue),
                Some(folder),
                num(c.uid_validity.into()),
                num(c.last_uid.into()),
            ]
        }
        Tree::Outbox => outbox(&record::<OutboxEntry>(t, key, value)?),
        Tree::Quarantine => match key.len() {
            8 => quarantine(&record::<QuarantineEntry>(t, key, value)?),
            _ => vec![key.get(..8).and_then(read_u64).and_then(num), text("raw")],
        },
        Tree::Customers | Tree::MessageCases | Tree::Referrers => {
            let (text, tail) = split_text_key(key, Some(8))?;
            vec![text, read_u64(tail).and_then(num)]
        }
        Tree::AutoReplies => {
            // recipient \0 time (8) outbox id (8)
            let at = key.len().checked_sub(16)?;
            let (recipient, _) = split_text_key(key, Some(16))?;
            let ms = i64::from_be_bytes(key.get(at..at + 8)?.try_into().ok()?);
            vec![
                recipient,
                DateTime::from_timestamp_millis(ms).and_then(time),
                key.get(at + 8..).and_then(read_u64).and_then(num),
            ]
        }
        Tree::Deadlines => vec![
            codec::deadline_at(key).and_then(time),
            key.get(8..).and_then(read_u64).and_then(num),
        ],
        Tree::OutboxPending => vec![read_u64(key).and_then(num)],
        // One case's facts (`k ++ id`); the rest (buckets a conversion
        // has not reached yet) have none.
        Tree::Facts => match key.first() {
            Some(b'k') => facts(&codec::facts::decode(value)?),
            _ => Vec::new(),
        },
        Tree::History | Tree::CaseMessages => {
            let case = key.get(..8).and_then(read_u64)?;
            let n = key.get(8..).and_then(read_u64)?;
            let mut cells = vec![num(case), num(n)];
            if t == Tree::CaseMessages {
                cells.push(read_u64(value).and_then(num));
            }
            cells
        }
    })
}

fn record<T: DeserializeOwned>(t: Tree, key: &[u8], value: &[u8]) -> Option<T> {
    codec::decode(t, key, value).ok()
}

fn case(c: &Case) -> Cells {
    vec![
        num(c.id),
        text(&c.queue),
        text(&c.customer),
        c.customer_name.as_deref().map(clean),
        text(&c.subject),
        name_of(&c.status),
        text(&c.tier),
        c.priority.as_deref().map(clean),
        time(c.created_at),
        time(c.updated_at),
        c.due_at.and_then(time),
        c.timer.and_then(|t| time(t.at)),
        c.timer.as_ref().and_then(|t| name_of(&t.kind)),
        c.first_answer_at.and_then(time),
        c.answered_at.and_then(time),
        c.resolved_at.and_then(time),
        num(c.escalations.into()),
        Some(c.breached.to_string()),
        Some(c.repeat_customer.to_string()),
        c.csat.map(|v| v.to_string()),
        num(c.message_count),
        c.previous_case.and_then(num),
        c.language.as_deref().map(clean),
    ]
}

fn message(m: &MessageRecord) -> Cells {
    vec![
        num(m.seq),
        num(m.case),
        text(&m.message_id),
        m.from.as_ref().map(|a| clean(&a.email)),
        m.from.as_ref().and_then(|a| a.name.as_deref()).map(clean),
        text(&m.subject),
        m.date.and_then(time),
        time(m.received_at),
        text(&m.folder),
        num(m.uid.into()),
        num(m.size as u64),
        Some(m.truncated.to_string()),
        m.suppressed.as_deref().map(clean),
    ]
}

fn outbox(e: &OutboxEntry) -> Cells {
    vec![
        num(e.id),
        num(e.case),
        text(&e.kind),
        text(&e.message_id),
        text(&e.from),
        text(&e.to.join(", ")),
        text(&e.subject),
        name_of(&e.state),
        num(e.attempts.into()),
        time(e.created_at),
        time(e.next_attempt_at),
        e.attempt_at.and_then(time),
        e.sent_at.and_then(time),
        e.last_error.as_deref().map(clean),
        e.claimed_by.as_deref().map(clean),
    ]
}

fn quarantine(q: &QuarantineEntry) -> Cells {
    vec![
        num(q.id),
        text("entry"),
        text(&q.queue),
        text(&q.folder),
        num(q.uid_validity.into()),
        num(q.uid.into()),
        text(&q.error),
        time(q.at),
        num(q.attempts.into()),
    ]
}

/// A case's facts as columns. The seconds and flags are what `stats`
/// counts, computed here as [`crate::stats`] computes them, so the SQL
/// that counts them gives the same figures.
fn facts(f: &Facts) -> Cells {
    let stints = &f.stints;
    let times = |t: &dyn Fn(&Stint) -> Option<DateTime<Utc>>| {
        array(stints.iter().map(|s| t(s).and_then(time)))
    };
    let secs = |to: Option<DateTime<Utc>>, from: DateTime<Utc>| {
        to.map(|t| (t - from).num_seconds().to_string())
    };
    let flag = |b: bool| Some(b.to_string());
    let left_for = |r: Reason| flag(stints.iter().any(|s| s.left.is_some_and(|l| l.1 == r)));
    // NULL (not an array of NULLs) when no tier answered: the rows that
    // have a value are found without taking the arrays apart.
    let stint_secs = match stints.iter().any(|s| s.first_answer.is_some()) {
        true => array(stints.iter().map(|s| secs(s.first_answer, s.from))),
        false => None,
    };
    vec![
        num(f.id),
        text(&f.queue),
        text(&f.tier),
        name_of(&f.status),
        time(f.created_at),
        f.first_answer_at.and_then(time),
        f.resolved_at.and_then(time),
        secs(f.first_answer_at, f.created_at),
        secs(f.resolved_at, f.created_at),
        flag(f.escalated()),
        left_for(Reason::Stale),
        left_for(Reason::RepeatCustomer),
        left_for(Reason::Trigger),
        left_for(Reason::Manual),
        flag(f.breached()),
        flag(f.repeat_customer),
        f.csat.map(|v| v.to_string()),
        num(f.bounces.into()),
        array(stints.iter().map(|s| text(&s.tier))),
        times(&|s| Some(s.from)),
        times(&|s| s.first_answer),
        stint_secs,
        times(&|s| s.left.map(|l| l.0)),
        array(
            stints
                .iter()
                .map(|s| s.left.map(|l| l.1.as_str().to_string())),
        ),
        array(stints.iter().map(|s| Some(s.deadline_missed.to_string()))),
        array(f.triggers.iter().map(|t| text(t))),
    ]
}

/// A PostgreSQL array literal (`{"a",NULL}`), cast by the statement to
/// the column's array type: every element quoted, so a comma, brace or
/// quote in a tier name or a trigger stays inside its element.
fn array(items: impl Iterator<Item = Option<String>>) -> Option<String> {
    let mut out = String::from("{");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Some(s) => {
                out.push('"');
                for ch in s.chars() {
                    if ch == '"' || ch == '\\' {
                        out.push('\\');
                    }
                    out.push(ch);
                }
                out.push('"');
            }
            None => out.push_str("NULL"),
        }
    }
    out.push('}');
    Some(out)
}

/// A `text \0 tail` key: the text (None when it is kept hashed, being
/// too long or holding a NUL: see `codec::key_text`) and the tail, of
/// `tail` bytes when the key space fixes it. A hashed text is a marker
/// and 32 bytes of hash, which may hold NULs of their own.
fn split_text_key(key: &[u8], tail: Option<usize>) -> Option<(Option<String>, &[u8])> {
    let hashed = key.first() == Some(&0xFF);
    let sep = match tail {
        Some(n) => key.len().checked_sub(n + 1)?,
        None if hashed => 33,
        None => key.iter().position(|b| *b == 0)?,
    };
    let (head, tail) = (key.get(..sep)?, key.get(sep + 1..)?);
    let text = match hashed {
        true => None,
        false => std::str::from_utf8(head).ok().map(clean),
    };
    Some((text, tail))
}

/// A serde unit variant's name (`open`, `due`, `pending`).
fn name_of<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

fn num(n: u64) -> Option<String> {
    // Above i64's range a bigint cannot hold it: left empty, not wrapped.
    i64::try_from(n).ok().map(|n| n.to_string())
}

fn text(s: &str) -> Option<String> {
    Some(clean(s))
}

/// PostgreSQL's text holds no NUL, which a sender may put in a name or a
/// subject: it would fail the whole write. Shown as U+FFFD instead.
fn clean(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

/// A time as PostgreSQL reads it; None (the column left empty) for a
/// year outside 1..=9999, which a sender's Date header may give: chrono
/// writes those with a sign PostgreSQL refuses, and one refused cell
/// would fail the whole commit.
fn time(t: DateTime<Utc>) -> Option<String> {
    (1..=9999)
        .contains(&t.year())
        .then(|| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_space_projects_as_many_values_as_its_table_has_columns() {
        for (t, _) in codec::TREES {
            assert_eq!(project(t, b"", b"").len(), of(t).len(), "{t:?}");
        }
    }

    #[test]
    fn a_nul_in_a_senders_text_does_not_reach_a_text_column() {
        let key = codec::customer_key("a\u{1}b@x", 7);
        let cells = project(Tree::Customers, &key, b"");
        assert_eq!(cells, vec![Some("a\u{1}b@x".into()), Some("7".into())]);
        assert_eq!(clean("a\0b"), "a\u{FFFD}b");
        // A time PostgreSQL cannot take is left empty, not sent.
        let far = DateTime::parse_from_rfc3339("9999-12-31T23:00:00-12:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(time(far), None);
        assert!(time(DateTime::UNIX_EPOCH).is_some());
        // A key text kept hashed has no text to show.
        let long = "x".repeat(2000);
        let key = codec::customer_key(&long, 7);
        assert_eq!(project(Tree::Customers, &key, b"")[0], None);
    }
}
