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

/// What the store can answer for threading. A failed read is an error,
/// never "not stored": taken as absent it would open a duplicate case.
pub trait Lookup {
    type Error;
    /// Is this exact message (ID and content hash) stored already?
    fn is_stored(&self, message_id: &str, content_hash: &str) -> Result<bool, Self::Error>;
    /// Cases holding a message with this ID (ours or customers'), oldest
    /// first, at most [`MAX_CASES_PER_ID`].
    fn cases_with_message_id(&self, message_id: &str) -> Result<Vec<CaseId>, Self::Error>;
    /// Cases holding a message that refers to this Message-ID (a reply
    /// that arrived before the message it answers), oldest first, at
    /// most [`MAX_CASES_PER_ID`].
    fn cases_referring_to(&self, message_id: &str) -> Result<Vec<CaseId>, Self::Error>;
    fn case(&self, id: CaseId) -> Result<Option<Case>, Self::Error>;
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
    /// A stored message refers to this one: its reply came first (mail
    /// is not delivered in the order it was sent).
    ReferredBy,
    Tag,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Reference => "reference",
            Via::OwnReference => "own_reference",
            Via::ReferredBy => "referred_by",
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
    /// An OAuth 2 identity needs a login (case 0: no case).
    Alert,
}

const KINDS: [(MailKind, char, &str); 9] = [
    (MailKind::Ack, 'a', "ack"),
    (MailKind::Notice, 'n', "notice"),
    (MailKind::Forward, 'f', "forward"),
    (MailKind::Relay, 'r', "relay"),
    (MailKind::Warn, 'w', "warning"),
    (MailKind::Renotify, 'b', "breach"),
    (MailKind::Survey, 's', "survey"),
    (MailKind::Digest, 'd', "digest"),
    (MailKind::Alert, 'o', "alert"),
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

/// Where `needle` occurs in `hay`, ignoring ASCII case, at or after
/// byte `from`. Offsets are into `hay` itself: never into a case-folded
/// copy, whose byte lengths differ (`İ` lower-cases to three bytes).
fn find_ascii_ci(hay: &str, needle: &str, from: usize) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.is_empty() || n.len() > h.len() {
        return None;
    }
    (from..=h.len() - n.len())
        .find(|&i| hay.is_char_boundary(i) && h[i..i + n.len()].eq_ignore_ascii_case(n))
}

/// Finds `[Tag #N]` in a subject (the tag word ignoring ASCII case) and
/// returns N with the tag's byte range in `subject`.
fn find_tag(subject: &str, tag: &str) -> Option<(CaseId, std::ops::Range<usize>)> {
    let needle = format!("[{tag} #");
    let mut from = 0;
    while let Some(start) = find_ascii_ci(subject, &needle, from) {
        let digits_at = start + needle.len();
        let rest = &subject[digits_at..];
        let n = rest.bytes().take_while(u8::is_ascii_digit).count();
        if n > 0 && rest[n..].starts_with(']') {
            if let Ok(id) = rest[..n].parse() {
                return Some((id, start..digits_at + n + 1));
            }
        }
        from = digits_at;
    }
    None
}

/// Finds `[Tag #N]` in a subject (the tag word case-insensitively).
pub fn subject_case(subject: &str, tag: &str) -> Option<CaseId> {
    find_tag(subject, tag).map(|(id, _)| id)
}

/// Reply and forward prefixes of common clients, in several languages.
const REPLY_PREFIXES: [&str; 9] = [
    "re:", "aw:", "fw:", "fwd:", "wg:", "sv:", "antw:", "tr:", "rv:",
];

/// Removes our tag and reply prefixes, for the case's subject line.
pub fn clean_subject(subject: &str, tag: &str) -> String {
    let mut s = subject.trim().to_string();
    if let Some((_, range)) = find_tag(&s, tag) {
        s.replace_range(range, "");
    }
    loop {
        let t = s.trim_start();
        let cut = REPLY_PREFIXES.iter().find(|p| {
            t.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        });
        match cut {
            Some(p) => s = t[p.len()..].to_string(),
            None => {
                s = t.trim().to_string();
                break;
            }
        }
    }
    s
}

/// Most stored messages looked at for one referenced Message-ID. Several
/// messages may share an ID (a sender can copy anyone's); the bound keeps
/// one lookup cheap however many were sent.
pub const MAX_CASES_PER_ID: usize = 4096;

/// How close the sender stands to a case, best first; `None`: not one of
/// its people, so a reference or tag must not join it.
fn closeness(case: &Case, sender: &str, mail: &InboundMail, parties: &Parties) -> Option<u8> {
    if sender.is_empty() {
        return None;
    }
    if case.customer == sender {
        return Some(0);
    }
    if case.participants.iter().any(|p| p == sender) {
        return Some(1);
    }
    if parties.support.iter().any(|s| s == sender) || (parties.is_staff)(sender) {
        // Support and staff write to the customer: the case whose
        // customer this mail is addressed to comes first.
        let to_customer = mail
            .to
            .iter()
            .chain(&mail.cc)
            .any(|a| a.email == case.customer);
        return Some(if to_customer { 2 } else { 3 });
    }
    None
}

/// Of `ids`, the case closest to the sender (then the oldest); None when
/// the sender is one of none of their people.
fn closest<L: Lookup>(
    lookup: &L,
    mut ids: Vec<CaseId>,
    sender: &str,
    mail: &InboundMail,
    parties: &Parties,
) -> Result<Option<CaseId>, L::Error> {
    ids.sort_unstable();
    ids.dedup();
    let mut best: Option<(u8, CaseId)> = None;
    for case_id in ids {
        if let Some(case) = lookup.case(case_id)? {
            if let Some(rank) = closeness(&case, sender, mail, parties) {
                if best.is_none_or(|b| (rank, case.id) < b) {
                    best = Some((rank, case.id));
                }
            }
        }
    }
    Ok(best.map(|(_, case)| case))
}

/// The threading decision for one message.
///
/// When several cases hold a referenced Message-ID, the one closest to
/// the sender wins (customer, participant, then support/staff writing to
/// that case's customer), then the oldest: never an order a sender can
/// tune, such as a content hash.
pub fn decide<L: Lookup>(
    mail: &InboundMail,
    lookup: &L,
    parties: &Parties,
    tag: &str,
    key: &[u8; 32],
) -> Result<Decision, L::Error> {
    if lookup.is_stored(&mail.message_id, &mail.content_hash)? {
        return Ok(Decision::Duplicate);
    }
    let sender = mail.from.as_ref().map(|a| a.email.as_str()).unwrap_or("");
    let belongs = |case: &Case| closeness(case, sender, mail, parties).is_some();

    // Most recent reference first: In-Reply-To, then References backwards.
    let refs = mail.in_reply_to.iter().chain(mail.references.iter().rev());
    for id in refs {
        if let Some(own) = OwnId::verify(id, key) {
            if let Some(case) = lookup.case(own.case)? {
                if belongs(&case) {
                    return Ok(Decision::Join {
                        case: case.id,
                        via: Via::OwnReference,
                    });
                }
            }
            continue;
        }
        let ids = lookup.cases_with_message_id(id)?;
        if let Some(case) = closest(lookup, ids, sender, mail, parties)? {
            return Ok(Decision::Join {
                case,
                via: Via::Reference,
            });
        }
    }

    if let Some(id) = subject_case(&mail.subject, tag) {
        if let Some(case) = lookup.case(id)? {
            if belongs(&case) {
                return Ok(Decision::Join {
                    case: id,
                    via: Via::Tag,
                });
            }
        }
    }
    // A reply stored before this message it answers. Stricter than the
    // rules above: only a case whose customer is this very sender (their
    // own follow-up came first, or an agent answered them from the Sent
    // folder). Anyone can cite a Message-ID before it arrives and make
    // its author a participant of his case by a Cc, and staff belong to
    // every case: neither may pull the original in.
    for id in lookup.cases_referring_to(&mail.message_id)? {
        if let Some(case) = lookup.case(id)? {
            if !sender.is_empty() && case.customer == sender {
                return Ok(Decision::Join {
                    case: id,
                    via: Via::ReferredBy,
                });
            }
        }
    }
    Ok(Decision::New)
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
        ids: HashMap<String, Vec<CaseId>>,
        referred: HashMap<String, Vec<CaseId>>,
        cases: HashMap<CaseId, Case>,
    }

    impl Lookup for Fake {
        type Error = std::convert::Infallible;
        fn is_stored(&self, id: &str, hash: &str) -> Result<bool, Self::Error> {
            Ok(self.stored.iter().any(|(i, h)| i == id && h == hash))
        }
        fn cases_with_message_id(&self, id: &str) -> Result<Vec<CaseId>, Self::Error> {
            Ok(self.ids.get(id).cloned().unwrap_or_default())
        }
        fn cases_referring_to(&self, id: &str) -> Result<Vec<CaseId>, Self::Error> {
            Ok(self.referred.get(id).cloned().unwrap_or_default())
        }
        fn case(&self, id: CaseId) -> Result<Option<Case>, Self::Error> {
            Ok(self.cases.get(&id).cloned())
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
        f.ids.insert("alice-1@example.org".into(), vec![42]);
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
        .unwrap_or_else(|e| match e {})
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
    fn copied_message_id_never_routes_alices_mail_into_a_strangers_case() {
        // Attack: Mallory sends a message carrying Alice's Message-ID with
        // Alice in Cc, so two cases hold that ID (and Alice is a
        // participant of Mallory's case). Alice's follow-up and the
        // agent's answer to Alice must still reach Alice's case, whatever
        // order the index returns the cases in.
        let mut f = fake();
        f.cases
            .insert(43, case(43, "mallory@example.net", &["alice@example.org"]));
        for order in [vec![43, 42], vec![42, 43]] {
            f.ids.insert("alice-1@example.org".into(), order);
            let follow_up = mail(
                "alice@example.org",
                "Re: printer",
                "In-Reply-To: <alice-1@example.org>\r\n",
            );
            assert_eq!(
                decide_(&f, &follow_up),
                Decision::Join {
                    case: 42,
                    via: Via::Reference
                }
            );
            let answer = mail(
                "support@example.test",
                "Re: printer",
                "To: alice@example.org\r\nIn-Reply-To: <alice-1@example.org>\r\n",
            );
            assert_eq!(
                decide_(&f, &answer),
                Decision::Join {
                    case: 42,
                    via: Via::Reference
                }
            );
            // Mallory's own reply goes to Mallory's case, never Alice's.
            let m = mail(
                "mallory@example.net",
                "Re: printer",
                "In-Reply-To: <alice-1@example.org>\r\n",
            );
            assert_eq!(
                decide_(&f, &m),
                Decision::Join {
                    case: 43,
                    via: Via::Reference
                }
            );
        }
    }

    #[test]
    fn several_cases_with_one_id_prefer_participant_then_oldest() {
        // Two cases hold the ID and the sender is a participant of the
        // newer and merely staff for neither customer: participant wins;
        // with equal standing the oldest (lowest number) wins.
        let mut f = fake();
        f.cases.insert(50, case(50, "carol@example.org", &[]));
        f.cases
            .insert(51, case(51, "dave@example.org", &["bob@example.org"]));
        f.ids.insert("shared@example.org".into(), vec![51, 50]);
        let bob = mail(
            "bob@example.org",
            "x",
            "In-Reply-To: <shared@example.org>\r\n",
        );
        assert_eq!(
            decide_(&f, &bob),
            Decision::Join {
                case: 51,
                via: Via::Reference
            }
        );
        let staff = mail(
            "tier2@example.test",
            "x",
            "In-Reply-To: <shared@example.org>\r\n",
        );
        assert_eq!(
            decide_(&f, &staff),
            Decision::Join {
                case: 50,
                via: Via::Reference
            }
        );
    }

    #[test]
    fn unicode_subject_with_tag_does_not_panic() {
        // Input: a Turkish subject whose lower-case copy is longer than
        // the original (`İ` → `i̇`): cutting the tag at the copy's offset
        // panicked and quarantined the customer's mail for good.
        assert_eq!(
            clean_subject("İade talebi [Case #12]", "Case"),
            "İade talebi"
        );
        assert_eq!(subject_case("İİİİ [case #12]", "Case"), Some(12));
        assert_eq!(
            clean_subject("ẞẞẞ AW: [CASE #7] Grüße", "Case"),
            "ẞẞẞ AW:  Grüße"
        );
        assert_eq!(clean_subject("Re: [Case #7] Grüße", "Case"), "Grüße");
    }

    proptest::proptest! {
        #[test]
        fn subject_helpers_never_panic_and_find_the_tag(
            before in "\\PC{0,12}",
            after in "\\PC{0,12}",
            id in 0u64..1_000_000,
        ) {
            let subject = format!("{before}[Case #{id}]{after}");
            let _ = clean_subject(&before, "Case");
            let _ = subject_case(&before, "Case");
            let found = subject_case(&subject, "Case");
            // An earlier tag in `before` may win; ours is found otherwise.
            if subject_case(&before, "Case").is_none() {
                proptest::prop_assert_eq!(found, Some(id));
                let cleaned = clean_subject(&subject, "Case");
                let tag = format!("[Case #{id}]");
                proptest::prop_assert!(!cleaned.contains(&tag));
            }
        }

        #[test]
        fn own_id_verify_never_panics(s in "\\PC{0,80}") {
            let _ = OwnId::verify(&s, &KEY);
        }
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
