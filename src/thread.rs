//! Thread: decide which case an inbound message belongs to. Pure, given
//! lookups into what is stored. Layers, strongest first:
//!
//! 1. the same Message-ID and content is already stored: a duplicate;
//! 2. In-Reply-To / References name a message of a case (ours carry the
//!    case number and a keyed hash, so they are checked without the index);
//! 3. the subject tag `[Case #N]`.
//!
//! Layers 2 and 3 only join a case when the sender is one of its people
//! (customer, participant, support, staff): a tag or a Message-ID copied
//! from someone else's mail (even from a forward that reached the wrong
//! hands) gets the sender a case of their own and nothing of the other.

use crate::case::{Case, CaseId};
use crate::message::InboundMail;

/// What the store can answer for threading.
pub trait Lookup {
    /// Is this exact message (ID and content hash) stored already?
    fn is_stored(&self, message_id: &str, content_hash: &str) -> bool;
    /// Cases holding a message with this ID (ours or customers').
    fn cases_with_message_id(&self, message_id: &str) -> Vec<CaseId>;
    fn case(&self, id: CaseId) -> Option<Case>;
}

/// Where an inbound message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Already stored: ingest nothing.
    Duplicate,
    Join {
        case: CaseId,
        via: Via,
    },
    New,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Reference,
    /// A reference to a Message-ID escalator made (checked by its hash).
    OwnReference,
    Tag,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Reference => "reference",
            Via::OwnReference => "own_reference",
            Via::Tag => "tag",
        }
    }
}

/// Who counts as the case's own people besides its customer and
/// participants: the support addresses (agents replying from the shared
/// mailbox).
pub struct Parties<'a> {
    pub support: &'a [String],
    /// Is this a staff address of some tier?
    pub is_staff: &'a dyn Fn(&str) -> bool,
}

/// The kinds of mail escalator sends, as written in its Message-IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailKind {
    Ack,
    Notice,
    Forward,
    Relay,
    Warn,
    Renotify,
    Survey,
    /// The periodic review digest to managers (case 0: no case).
    Digest,
}

const KINDS: [(MailKind, char, &str); 8] = [
    (MailKind::Ack, 'a', "ack"),
    (MailKind::Notice, 'n', "notice"),
    (MailKind::Forward, 'f', "forward"),
    (MailKind::Relay, 'r', "relay"),
    (MailKind::Warn, 'w', "warning"),
    (MailKind::Renotify, 'b', "breach"),
    (MailKind::Survey, 's', "survey"),
    (MailKind::Digest, 'd', "digest"),
];

impl MailKind {
    fn letter(self) -> char {
        KINDS
            .iter()
            .find(|k| k.0 == self)
            .map(|k| k.1)
            .unwrap_or('x')
    }
    fn from_letter(c: char) -> Option<MailKind> {
        KINDS.iter().find(|k| k.1 == c).map(|k| k.0)
    }
    /// Staff-facing mail carries IDs customers never see: a reply that
    /// names one comes from someone the case was sent to.
    pub fn staff_facing(self) -> bool {
        matches!(
            self,
            MailKind::Forward | MailKind::Warn | MailKind::Renotify
        )
    }
    pub fn as_str(self) -> &'static str {
        KINDS
            .iter()
            .find(|k| k.0 == self)
            .map(|k| k.2)
            .unwrap_or("mail")
    }
}

/// A Message-ID escalator made: `c42.a7.<mac>@domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnId {
    pub case: CaseId,
    pub kind: MailKind,
    /// The outbox entry, unique per mail.
    pub seq: u64,
}

impl OwnId {
    pub fn format(&self, key: &[u8; 32], domain: &str) -> String {
        let local = format!("c{}.{}{}", self.case, self.kind.letter(), self.seq);
        format!("{local}.{}@{domain}", mac(key, &local))
    }

    /// Reads and checks an ID; a wrong hash (a forged case number) is None.
    pub fn verify(id: &str, key: &[u8; 32]) -> Option<OwnId> {
        let local = id.split('@').next()?;
        let (body, tag) = local.rsplit_once('.')?;
        let (case, rest) = body.strip_prefix('c')?.split_once('.')?;
        let mut chars = rest.chars();
        let kind = MailKind::from_letter(chars.next()?)?;
        let seq = chars.as_str().parse().ok()?;
        let case = case.parse().ok()?;
        // Constant-time compare, so a forger learns nothing from timing.
        let expected = mac(key, body);
        let same = expected.len() == tag.len()
            && expected
                .bytes()
                .zip(tag.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then_some(OwnId { case, kind, seq })
    }
}

fn mac(key: &[u8; 32], text: &str) -> String {
    let h = blake3::keyed_hash(key, text.as_bytes());
    // 60 bits in base-36-ish lower-case: short, and enough that guessing
    // one for another case is hopeless.
    let mut n = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8])) >> 4;
    let alphabet = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = String::new();
    for _ in 0..12 {
        out.push(alphabet[(n % 36) as usize] as char);
        n /= 36;
    }
    out
}

/// Finds `[Tag #N]` in a subject (the tag word case-insensitively).
pub fn subject_case(subject: &str, tag: &str) -> Option<CaseId> {
    let lower = subject.to_lowercase();
    let needle = format!("[{} #", tag.to_lowercase());
    let mut from = 0;
    while let Some(i) = lower[from..].find(&needle) {
        let start = from + i + needle.len();
        let digits: String = lower[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if !digits.is_empty() && lower[start + digits.len()..].starts_with(']') {
            return digits.parse().ok();
        }
        from = start;
    }
    None
}

/// Removes our tag and reply prefixes, for the case's subject line.
pub fn clean_subject(subject: &str, tag: &str) -> String {
    let mut s = subject.trim().to_string();
    if let Some(id) = subject_case(&s, tag) {
        let lower = s.to_lowercase();
        let t = format!("[{} #{}]", tag.to_lowercase(), id);
        if let Some(i) = lower.find(&t) {
            s.replace_range(i..i + t.len(), "");
        }
    }
    loop {
        let t = s.trim_start();
        let lower = t.to_lowercase();
        let cut = ["re:", "aw:", "fw:", "fwd:", "wg:", "sv:", "antw:"]
            .iter()
            .find(|p| lower.starts_with(*p))
            .map(|p| p.len());
        match cut {
            Some(n) => s = t[n..].to_string(),
            None => {
                s = t.trim().to_string();
                break;
            }
        }
    }
    s
}

/// The threading decision for one message.
pub fn decide(
    mail: &InboundMail,
    lookup: &dyn Lookup,
    parties: &Parties,
    tag: &str,
    key: &[u8; 32],
) -> Decision {
    if lookup.is_stored(&mail.message_id, &mail.content_hash) {
        return Decision::Duplicate;
    }
    let sender = mail.from.as_ref().map(|a| a.email.as_str()).unwrap_or("");
    let belongs = |case: &Case| {
        case.is_participant(sender)
            || parties.support.iter().any(|s| s == sender)
            || (parties.is_staff)(sender)
    };

    // Most recent reference first: In-Reply-To, then References backwards.
    let refs = mail.in_reply_to.iter().chain(mail.references.iter().rev());
    for id in refs {
        if let Some(own) = OwnId::verify(id, key) {
            if let Some(case) = lookup.case(own.case) {
                if belongs(&case) {
                    return Decision::Join {
                        case: case.id,
                        via: Via::OwnReference,
                    };
                }
            }
            continue;
        }
        for case_id in lookup.cases_with_message_id(id) {
            if let Some(case) = lookup.case(case_id) {
                if belongs(&case) {
                    return Decision::Join {
                        case: case_id,
                        via: Via::Reference,
                    };
                }
            }
        }
    }
    if let Some(id) = subject_case(&mail.subject, tag) {
        if let Some(case) = lookup.case(id) {
            if belongs(&case) {
                return Decision::Join {
                    case: id,
                    via: Via::Tag,
                };
            }
        }
    }
    Decision::New
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::parse;
    use chrono::Utc;
    use std::collections::HashMap;

    const KEY: [u8; 32] = [7; 32];

    #[derive(Default)]
    struct Fake {
        stored: Vec<(String, String)>,
        ids: HashMap<String, CaseId>,
        cases: HashMap<CaseId, Case>,
    }

    impl Lookup for Fake {
        fn is_stored(&self, id: &str, hash: &str) -> bool {
            self.stored.iter().any(|(i, h)| i == id && h == hash)
        }
        fn cases_with_message_id(&self, id: &str) -> Vec<CaseId> {
            self.ids.get(id).copied().into_iter().collect()
        }
        fn case(&self, id: CaseId) -> Option<Case> {
            self.cases.get(&id).cloned()
        }
    }

    fn case(id: CaseId, customer: &str, participants: &[&str]) -> Case {
        let mut c = Case::new(id, customer, "s", "Frontline", "root@x", Utc::now());
        c.participants = participants.iter().map(|s| s.to_string()).collect();
        c
    }

    fn fake() -> Fake {
        let mut f = Fake::default();
        f.cases
            .insert(42, case(42, "alice@example.org", &["bob@example.org"]));
        f.ids.insert("alice-1@example.org".into(), 42);
        f
    }

    fn mail(from: &str, subject: &str, extra: &str) -> InboundMail {
        parse(
            format!(
                "From: {from}\r\nSubject: {subject}\r\nMessage-ID: <n@x>\r\n{extra}\r\nbody\r\n"
            )
            .as_bytes(),
        )
    }

    fn decide_(f: &Fake, m: &InboundMail) -> Decision {
        let support = vec!["support@example.test".to_string()];
        let staff = |a: &str| a == "tier2@example.test";
        decide(
            m,
            f,
            &Parties {
                support: &support,
                is_staff: &staff,
            },
            "Case",
            &KEY,
        )
    }

    #[test]
    fn same_message_again_is_a_duplicate_but_same_id_other_content_is_not() {
        let mut f = fake();
        let m = mail("alice@example.org", "hi", "");
        f.stored
            .push((m.message_id.clone(), m.content_hash.clone()));
        assert_eq!(decide_(&f, &m), Decision::Duplicate);
        let other = mail("alice@example.org", "hi, different", "");
        assert_eq!(other.message_id, m.message_id);
        assert_ne!(decide_(&f, &other), Decision::Duplicate);
    }

    #[test]
    fn reply_by_reference_joins_without_tag() {
        let f = fake();
        let m = mail(
            "alice@example.org",
            "Re: printer",
            "In-Reply-To: <alice-1@example.org>\r\n",
        );
        assert_eq!(
            decide_(&f, &m),
            Decision::Join {
                case: 42,
                via: Via::Reference
            }
        );
    }

    #[test]
    fn own_id_joins_even_when_not_indexed() {
        let f = fake();
        let id = OwnId {
            case: 42,
            kind: MailKind::Ack,
            seq: 3,
        }
        .format(&KEY, "example.test");
        let m = mail(
            "alice@example.org",
            "Re: printer",
            &format!("References: <{id}>\r\n"),
        );
        assert_eq!(
            decide_(&f, &m),
            Decision::Join {
                case: 42,
                via: Via::OwnReference
            }
        );
    }

    #[test]
    fn forged_own_id_for_another_case_is_rejected() {
        let mut f = fake();
        f.cases.insert(43, case(43, "eve@example.org", &[]));
        let eve = OwnId {
            case: 43,
            kind: MailKind::Ack,
            seq: 1,
        }
        .format(&KEY, "example.test");
        let forged = eve.replacen("c43.", "c42.", 1);
        assert!(OwnId::verify(&forged, &KEY).is_none());
        assert_eq!(OwnId::verify(&eve, &KEY).map(|o| o.case), Some(43));
        // Even Alice's own case: a forged hash is never trusted.
        let m = mail(
            "alice@example.org",
            "x",
            &format!("In-Reply-To: <{forged}>\r\n"),
        );
        assert_eq!(decide_(&f, &m), Decision::New);
    }

    #[test]
    fn tag_from_customer_or_participant_joins() {
        let f = fake();
        for from in [
            "alice@example.org",
            "Bob <BOB@example.org>",
            "support@example.test",
        ] {
            let m = mail(from, "Re: [Case #42] printer", "");
            assert_eq!(
                decide_(&f, &m),
                Decision::Join {
                    case: 42,
                    via: Via::Tag
                },
                "{from}"
            );
        }
    }

    #[test]
    fn stranger_with_tag_or_copied_reference_gets_a_new_case() {
        let f = fake();
        let m = mail("mallory@example.net", "[Case #42] gimme", "");
        assert_eq!(decide_(&f, &m), Decision::New);
        let m = mail(
            "mallory@example.net",
            "x",
            "In-Reply-To: <alice-1@example.org>\r\n",
        );
        assert_eq!(decide_(&f, &m), Decision::New);
        let ack = OwnId {
            case: 42,
            kind: MailKind::Ack,
            seq: 1,
        }
        .format(&KEY, "example.test");
        let m = mail(
            "mallory@example.net",
            "x",
            &format!("References: <{ack}>\r\n"),
        );
        assert_eq!(decide_(&f, &m), Decision::New);
    }

    #[test]
    fn staff_with_the_tag_join_the_case() {
        let f = fake();
        let m = mail("tier2@example.test", "Re: [Case #42] printer", "");
        assert_eq!(
            decide_(&f, &m),
            Decision::Join {
                case: 42,
                via: Via::Tag
            }
        );
    }

    #[test]
    fn a_leaked_forward_id_admits_no_outsider() {
        let f = fake();
        let fwd = OwnId {
            case: 42,
            kind: MailKind::Forward,
            seq: 9,
        }
        .format(&KEY, "example.test");
        let m = mail(
            "mallory@example.net",
            "x",
            &format!("In-Reply-To: <{fwd}>\r\n"),
        );
        assert_eq!(decide_(&f, &m), Decision::New);
        let m = mail(
            "tier2@example.test",
            "x",
            &format!("In-Reply-To: <{fwd}>\r\n"),
        );
        assert_eq!(
            decide_(&f, &m),
            Decision::Join {
                case: 42,
                via: Via::OwnReference
            }
        );
    }

    #[test]
    fn unknown_tag_number_starts_new_case() {
        let f = fake();
        let m = mail("alice@example.org", "[Case #999] hello", "");
        assert_eq!(decide_(&f, &m), Decision::New);
    }

    #[test]
    fn subject_tags() {
        assert_eq!(subject_case("Re: [Case #42] x", "Case"), Some(42));
        assert_eq!(subject_case("re: [case #7]", "Case"), Some(7));
        assert_eq!(subject_case("[Case #] x [Case #8]", "Case"), Some(8));
        assert_eq!(subject_case("[Case #4x]", "Case"), None);
        assert_eq!(subject_case("[Ticket #5]", "Case"), None);
        assert_eq!(subject_case("[Ticket #5]", "Ticket"), Some(5));
        assert_eq!(
            clean_subject("Re: AW: [Case #42] Printer", "Case"),
            "Printer"
        );
        assert_eq!(clean_subject("Fwd: hello", "Case"), "hello");
    }
}
