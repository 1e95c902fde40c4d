//! Which inbound messages must get no automatic answer: robots, bounces,
//! lists and our own mail. Pure. Such messages are still stored and
//! threaded; only the answer is withheld, which is how two robots are kept
//! from mailing each other forever (RFC 3834 §2).

use std::fmt;

use crate::message::InboundMail;

/// Why no automatic answer goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Suppress {
    AutoSubmitted(String),
    Precedence(String),
    AutoReplyHeader,
    MailingList,
    Bounce,
    RobotSender(String),
    NoResponseWanted,
    OwnMail,
    LoopHeader(String),
    NoSender,
}

impl fmt::Display for Suppress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suppress::AutoSubmitted(v) => write!(f, "Auto-Submitted: {v}"),
            Suppress::Precedence(v) => write!(f, "Precedence: {v}"),
            Suppress::AutoReplyHeader => f.write_str("X-Autoreply header"),
            Suppress::MailingList => f.write_str("mailing-list message"),
            Suppress::Bounce => f.write_str("delivery report (bounce)"),
            Suppress::RobotSender(a) => write!(f, "robot sender {a}"),
            Suppress::NoResponseWanted => f.write_str("X-Auto-Response-Suppress"),
            Suppress::OwnMail => f.write_str("sent by the support address"),
            Suppress::LoopHeader(v) => write!(f, "loop header from {v}"),
            Suppress::NoSender => f.write_str("no sender address"),
        }
    }
}

impl Suppress {
    /// Automatic mail (out-of-office, bounces...) must not count as the
    /// customer writing again; list mail and our own do count as mail.
    pub fn is_automatic(&self) -> bool {
        !matches!(self, Suppress::OwnMail | Suppress::NoSender)
    }
}

const ROBOT_LOCALS: &[&str] = &[
    "mailer-daemon",
    "postmaster",
    "noreply",
    "no-reply",
    "no_reply",
    "donotreply",
    "do-not-reply",
    "bounce",
    "bounces",
];

/// One recipient for the automatic-mail limit: plus-addressed variants of
/// a mailbox (`a+1@x`, `a+2@x`) are the same person, so a flood cannot
/// multiply its answers by varying the tag.
pub fn recipient_key(email: &str) -> String {
    let email = email.trim().to_lowercase();
    match email.rsplit_once('@') {
        // A quoted local part is taken as it is: `+` is just a character.
        Some((local, domain)) if !local.starts_with('"') => {
            let base = local.split('+').next().unwrap_or(local);
            let base = if base.is_empty() { local } else { base };
            format!("{base}@{domain}")
        }
        _ => email,
    }
}

/// Returns why `mail` must not be answered automatically, if it must not.
pub fn classify(mail: &InboundMail, support: &[String]) -> Option<Suppress> {
    let r = &mail.robot;
    if let Some(v) = &r.loop_header {
        return Some(Suppress::LoopHeader(v.clone()));
    }
    let from = mail.from.as_ref().map(|a| a.email.as_str());
    if let Some(f) = from {
        if support.iter().any(|s| s == f) {
            return Some(Suppress::OwnMail);
        }
    }
    if let Some(v) = &r.auto_submitted {
        if v.split(';').next().map(str::trim) != Some("no") {
            return Some(Suppress::AutoSubmitted(v.clone()));
        }
    }
    if let Some(v) = &r.precedence {
        if ["bulk", "junk", "list", "auto_reply"].contains(&v.trim()) {
            return Some(Suppress::Precedence(v.clone()));
        }
    }
    if r.x_autoreply {
        return Some(Suppress::AutoReplyHeader);
    }
    let null_path = |p: &Option<String>| p.as_deref() == Some("");
    if r.delivery_report
        || r.failed_recipients
        || null_path(&r.return_path)
        || null_path(&r.reverse_path)
    {
        return Some(Suppress::Bounce);
    }
    if r.list {
        return Some(Suppress::MailingList);
    }
    if let Some(v) = &r.auto_response_suppress {
        // Exchange's way of asking: All, OOF, AutoReply suppress us.
        let v = v.to_ascii_lowercase();
        if v.contains("all") || v.contains("autoreply") || v.contains("oof") {
            return Some(Suppress::NoResponseWanted);
        }
    }
    let Some(f) = from else {
        return Some(Suppress::NoSender);
    };
    let local = f.split('@').next().unwrap_or("");
    if ROBOT_LOCALS.contains(&local)
        || local.starts_with("noreply")
        || local.starts_with("no-reply")
    {
        return Some(Suppress::RobotSender(f.to_string()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_addresses_are_one_recipient() {
        assert_eq!(recipient_key("A+1@X.org"), "a@x.org");
        assert_eq!(recipient_key("a+2+3@x.org"), "a@x.org");
        assert_eq!(recipient_key("a@x.org"), "a@x.org");
        assert_eq!(recipient_key("+tag@x.org"), "+tag@x.org");
        assert_eq!(recipient_key("\"a+b\"@x.org"), "\"a+b\"@x.org");
    }

    proptest::proptest! {
        #[test]
        fn recipient_key_never_panics(s in "\\PC{0,40}") {
            let k = recipient_key(&s);
            proptest::prop_assert_eq!(recipient_key(&k), k.clone());
        }
    }
    use crate::message::parse;

    fn check(headers: &str) -> Option<Suppress> {
        let raw = format!("{headers}\r\nSubject: x\r\n\r\nbody\r\n");
        classify(
            &parse(raw.as_bytes()),
            &["support@example.test".to_string()],
        )
    }

    #[test]
    fn a_person_is_answered() {
        assert_eq!(check("From: alice@example.org"), None);
        assert_eq!(check("From: alice@example.org\r\nAuto-Submitted: no"), None);
        assert_eq!(
            check("From: alice@example.org\r\nPrecedence: first-class"),
            None
        );
    }

    #[test]
    fn robots_are_not_answered() {
        let cases = [
            ("Auto-Submitted: auto-replied", "Auto-Submitted"),
            ("Auto-Submitted: auto-generated", "Auto-Submitted"),
            ("Precedence: bulk", "Precedence"),
            ("Precedence: junk", "Precedence"),
            ("Precedence: list", "Precedence"),
            ("Precedence: auto_reply", "Precedence"),
            ("X-Autoreply: yes", "X-Autoreply"),
            ("X-Autorespond: yes", "X-Autoreply"),
            ("List-Id: <l.example.org>", "mailing-list"),
            ("List-Unsubscribe: <mailto:u@example.org>", "mailing-list"),
            ("Return-Path: <>", "bounce"),
            ("X-Failed-Recipients: x@example.org", "bounce"),
            (
                "Content-Type: multipart/report; report-type=delivery-status; boundary=b",
                "bounce",
            ),
            ("X-Auto-Response-Suppress: All", "X-Auto-Response-Suppress"),
            (
                "X-Auto-Response-Suppress: OOF, AutoReply",
                "X-Auto-Response-Suppress",
            ),
            ("X-Escalator-Loop: support@other.test", "loop header"),
        ];
        for (h, want) in cases {
            let got = check(&format!("From: alice@example.org\r\n{h}"))
                .unwrap_or_else(|| panic!("{h} should be suppressed"));
            assert!(got.to_string().contains(want), "{h}: {got}");
        }
    }

    #[test]
    fn robot_and_own_senders() {
        for from in [
            "MAILER-DAEMON@example.org",
            "postmaster@example.org",
            "noreply@example.org",
            "no-reply@example.org",
            "noreply-alerts@example.org",
        ] {
            assert!(
                matches!(
                    check(&format!("From: {from}")),
                    Some(Suppress::RobotSender(_))
                ),
                "{from}"
            );
        }
        assert_eq!(
            check("From: Support <SUPPORT@example.test>"),
            Some(Suppress::OwnMail)
        );
        assert_eq!(check("To: a@example.org"), Some(Suppress::NoSender));
    }

    #[test]
    fn automatic_mail_does_not_count_as_the_customer() {
        assert!(Suppress::AutoSubmitted("auto-replied".into()).is_automatic());
        assert!(!Suppress::OwnMail.is_automatic());
    }
}
