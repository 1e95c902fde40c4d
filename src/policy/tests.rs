//! Policy rules with a fake clock: deadlines, each escalation reason,
//! staff answers, resolution and follow-up.

use super::*;
use crate::mailtext::ack_text;
use crate::message::parse;
use std::path::Path;

mod surveys;

const CONFIG: &str = r#"
[calendar]
timezone = "Europe/Berlin"
hours = ["mon-fri 09:00-17:30"]
[[tiers]]
name = "Frontline"
staff = ["agent@example.test", "@support.example.test"]
first_response = "4h"
follow_up = "8h"
warn_before = "30m"
[tiers.priority.urgent]
first_response = "1h"
[[tiers]]
name = "Tier 2"
staff = ["tier2@example.test"]
forward_to = ["tier2@example.test"]
first_response = "8h"
renotify = "2h"
[repeat_customer]
cases = 3
within = "30d"
tier = "Tier 2"
unanswered = 4
[[triggers]]
phrases = ["speak to a supervisor", "manager"]
escalate = true
[[triggers]]
headers = ["Importance: high", "X-Priority: 1"]
priority = "urgent"
[resolution]
auto_resolve_after = "5d"
reopen_within = "14d"
survey = true
"#;

fn config() -> Config {
    crate::testing::config_from(Path::new("/tmp/x"), "", CONFIG)
}

/// The whole text of [`config`], for tests that change it.
fn text() -> String {
    crate::fixture::config_text(Path::new("/tmp/x"), "", CONFIG)
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn mail(from: &str, subject: &str, extra: &str, body: &str) -> InboundMail {
    parse(format!("From: {from}\r\nTo: support@example.test\r\nSubject: {subject}\r\nMessage-ID: <m{}@x>\r\n{extra}\r\n{body}\r\n", body.len()).as_bytes())
}

fn new_case(c: &Config, now: DateTime<Utc>, m: &InboundMail, recent: usize) -> (Case, Vec<Action>) {
    let mut case = open_case(7, m, c, "default", now);
    let ctx = Ctx { config: c, now };
    let a = on_new_case(&mut case, m, None, recent, &ctx);
    (case, a)
}

const MON_9: &str = "2026-11-23T09:00:00Z"; // 10:00 in Berlin

#[test]
fn new_case_ack_names_first_tier_and_deadline_with_warning() {
    let c = config();
    let now = at(MON_9);
    let (case, actions) = new_case(
        &c,
        now,
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    assert_eq!(
        actions,
        vec![Action::Ack {
            eta: at("2026-11-23T13:00:00Z")
        }]
    );
    assert_eq!(case.due_at, Some(at("2026-11-23T13:00:00Z")));
    assert_eq!(
        case.timer,
        Some(Timer {
            at: at("2026-11-23T12:30:00Z"),
            kind: TimerKind::Warn
        })
    );
    let (subject, body) = ack_text(&case, at("2026-11-23T13:00:00Z"), &c, now);
    assert_eq!(subject, "[Case #7] Re: Printer");
    assert!(body.contains("within 4 business hours"), "{body}");
    assert!(
        body.contains("Monday, 23 November 2026, 14:00 CET"),
        "{body}"
    );
    // Over a night the words still count business time.
    let late = at("2026-11-23T16:00:00Z");
    let (case, _) = new_case(
        &c,
        late,
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let (_, body) = ack_text(&case, case.due_at.unwrap(), &c, late);
    assert!(body.contains("within 4 business hours"), "{body}");
    assert!(
        body.contains("Tuesday, 24 November 2026, 12:30 CET"),
        "{body}"
    );
}

#[test]
fn stale_case_warns_then_escalates_then_breaches_and_renotifies() {
    let c = config();
    let (mut case, _) = new_case(
        &c,
        at(MON_9),
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let ctx = |now| Ctx { config: &c, now };
    // Too early: nothing.
    assert!(on_timer(&mut case, &ctx(at("2026-11-23T12:00:00Z"))).is_empty());
    assert_eq!(
        on_timer(&mut case, &ctx(at("2026-11-23T12:30:00Z"))),
        vec![Action::Warn { tier: 0 }]
    );
    assert_eq!(case.timer.unwrap().kind, TimerKind::Due);
    let actions = on_timer(&mut case, &ctx(at("2026-11-23T13:00:00Z")));
    assert!(
        matches!(
            actions[0],
            Action::Forward {
                tier: 1,
                reason: Reason::Stale,
                ..
            }
        ),
        "{actions:?}"
    );
    // Tier 2's 8h from Monday 14:00 CET: 3.5h Monday, 4.5h Tuesday → 13:30 CET.
    assert_eq!(
        actions[1],
        Action::Notice {
            eta: at("2026-11-24T12:30:00Z")
        }
    );
    assert_eq!(case.tier, "Tier 2");
    assert_eq!(case.escalations, 1);
    assert!(case.new_events.iter().any(|e| matches!(&e.what, EventKind::Escalated { from, to, reason: Reason::Stale, .. } if from == "Frontline" && to == "Tier 2")));
    // At the top tier the deadline marks the case breached and
    // re-notifies every `renotify`, with no customer notice.
    let a = on_timer(&mut case, &ctx(at("2026-11-24T12:30:00Z")));
    assert_eq!(a, vec![Action::Renotify { tier: 1 }]);
    assert!(case.breached);
    assert_eq!(
        case.timer,
        Some(Timer {
            at: at("2026-11-24T14:30:00Z"),
            kind: TimerKind::Renotify
        })
    );
    assert_eq!(
        on_timer(&mut case, &ctx(at("2026-11-24T14:30:00Z"))),
        vec![Action::Renotify { tier: 1 }]
    );
    assert_eq!(case.escalations, 1, "never loops past the top");
}

#[test]
fn staff_answer_stops_the_clock_and_customer_reopens_it_with_follow_up() {
    let c = config();
    let (mut case, _) = new_case(
        &c,
        at(MON_9),
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let ctx = Ctx {
        config: &c,
        now: at("2026-11-23T10:00:00Z"),
    };
    let answer = mail(
        "agent@example.test",
        "Re: Printer",
        "",
        "Try turning it off.",
    );
    assert_eq!(
        on_message(&mut case, &answer, Role::SupportAgent, None, &ctx),
        vec![]
    );
    assert_eq!(case.status, Status::Answered);
    assert_eq!(case.due_at, None);
    assert_eq!(case.timer.unwrap().kind, TimerKind::AutoResolve);
    let ctx = Ctx {
        config: &c,
        now: at("2026-11-23T11:00:00Z"),
    };
    let again = mail("alice@example.org", "Re: Printer", "", "Still on fire");
    on_message(&mut case, &again, Role::Customer, None, &ctx);
    assert_eq!(case.status, Status::Open);
    // follow_up 8h from Monday 12:00 CET: 5.5h Monday, 2.5h Tuesday → 11:30.
    assert_eq!(case.due_at, Some(at("2026-11-24T10:30:00Z")));
}

#[test]
fn automatic_mail_never_touches_the_clock() {
    let c = config();
    let (mut case, _) = new_case(
        &c,
        at(MON_9),
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let due = case.due_at;
    let ctx = Ctx {
        config: &c,
        now: at("2026-11-23T10:00:00Z"),
    };
    let ooo = mail(
        "alice@example.org",
        "Out of office",
        "Auto-Submitted: auto-replied\r\n",
        "away",
    );
    let s = crate::suppress::classify(&ooo, &c.support_addresses());
    assert!(on_message(&mut case, &ooo, Role::Customer, s.as_ref(), &ctx).is_empty());
    assert_eq!(case.due_at, due);
    assert_eq!(case.unanswered, 1);
}

#[test]
fn trigger_phrase_escalates_at_once_but_not_when_quoted() {
    let c = config();
    let now = at(MON_9);
    let m = mail(
        "bob@example.org",
        "Billing",
        "",
        "I want to speak to a supervisor now.",
    );
    let (case, actions) = new_case(&c, now, &m, 1);
    assert_eq!(case.tier, "Tier 2");
    assert!(matches!(actions[0], Action::Ack { .. }));
    assert!(matches!(
        actions[1],
        Action::Forward {
            tier: 1,
            reason: Reason::Trigger,
            ..
        }
    ));
    assert_eq!(
        actions.len(),
        2,
        "the ack names the new tier; no separate notice"
    );
    let quoted = mail(
        "bob@example.org",
        "Billing",
        "",
        "Thanks!\n\nOn Monday, Support wrote:\n> speak to a supervisor",
    );
    let (case, _) = new_case(&c, now, &quoted, 1);
    assert_eq!(case.tier, "Frontline");
    let management = mail("bob@example.org", "Management question", "", "hello");
    assert!(
        match_triggers(&management, &c).is_empty(),
        "whole words only"
    );
    let subject = mail("bob@example.org", "I want my MANAGER", "", "hello");
    assert_eq!(match_triggers(&subject, &c).len(), 1);
}

#[test]
fn header_trigger_sets_priority_and_its_timeline() {
    let c = config();
    let m = mail(
        "bob@example.org",
        "Down",
        "X-Priority: 1 (Highest)\r\n",
        "site down",
    );
    let (case, _) = new_case(&c, at(MON_9), &m, 1);
    assert_eq!(case.priority.as_deref(), Some("urgent"));
    assert_eq!(case.due_at, Some(at("2026-11-23T10:00:00Z")), "urgent: 1h");
    assert_eq!(case.tier, "Frontline");
}

#[test]
fn repeat_customer_starts_at_the_configured_tier() {
    let c = config();
    let m = mail("carol@example.org", "Again", "", "third time");
    let (case, actions) = new_case(&c, at(MON_9), &m, 3);
    assert_eq!(case.tier, "Tier 2");
    assert_eq!(
        actions[0],
        Action::Ack {
            eta: case.due_at.unwrap()
        }
    );
    assert!(matches!(
        actions[1],
        Action::Forward {
            tier: 1,
            reason: Reason::RepeatCustomer,
            ..
        }
    ));
    let (case, _) = new_case(&c, at(MON_9), &m, 2);
    assert_eq!(case.tier, "Frontline");
}

#[test]
fn many_unanswered_messages_jump_to_the_repeat_tier() {
    let c = config();
    let (mut case, _) = new_case(&c, at(MON_9), &mail("dan@example.org", "x", "", "1"), 1);
    let ctx = Ctx {
        config: &c,
        now: at("2026-11-23T09:30:00Z"),
    };
    for n in 2..4 {
        assert!(on_message(
            &mut case,
            &mail("dan@example.org", "x", "", &"n".repeat(n)),
            Role::Customer,
            None,
            &ctx
        )
        .is_empty());
    }
    let a = on_message(
        &mut case,
        &mail("dan@example.org", "x", "", "nnnn"),
        Role::Customer,
        None,
        &ctx,
    );
    assert!(
        matches!(
            a[0],
            Action::Forward {
                reason: Reason::RepeatCustomer,
                ..
            }
        ),
        "{a:?}"
    );
    assert!(matches!(a[1], Action::Notice { .. }));
}

#[test]
fn verified_staff_reply_is_relayed_note_is_not_and_resolve_resolves() {
    let c = config();
    let (mut case, _) = new_case(
        &c,
        at(MON_9),
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let ctx = Ctx {
        config: &c,
        now: at("2026-11-23T10:00:00Z"),
    };
    let note = mail(
        "tier2@example.test",
        "Re: x",
        "",
        "#note\nlooks like hardware",
    );
    assert!(on_message(&mut case, &note, Role::Staff, None, &ctx).is_empty());
    assert_eq!(case.status, Status::Open, "a note is no answer");
    let forged = mail(
        "tier2@example.test",
        "Re: x",
        "",
        "#resolve\nsend me your password",
    );
    assert!(on_message(
        &mut case,
        &forged,
        Role::UnverifiedStaff { stops_clock: false },
        None,
        &ctx
    )
    .is_empty());
    assert_eq!(case.status, Status::Open);
    let reply = mail(
        "tier2@example.test",
        "Re: x",
        "",
        "Replace the fuser.\n#resolve\n\nOn Mon, Support wrote:\n> summary",
    );
    let a = on_message(&mut case, &reply, Role::Staff, None, &ctx);
    assert_eq!(
        a,
        vec![
            Action::Relay {
                text: "Replace the fuser.".into(),
                from: "tier2@example.test".into()
            },
            Action::Survey
        ]
    );
    assert_eq!(case.status, Status::Resolved);
}

#[test]
fn staff_replies_never_relay_the_forwards_summary() {
    // Input: a German Outlook reply (no English markers) and one from a
    // client whose quoting we do not know: the whole forward (summary,
    // history, notes) went to the customer.
    let c = config();
    let (mut case, _) = new_case(
        &c,
        at(MON_9),
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let ctx = Ctx {
        config: &c,
        now: at("2026-11-23T10:00:00Z"),
    };
    let german = mail(
        "tier2@example.test",
        "AW: x",
        "",
        "Der Drucker ist repariert.\n\n-----Ursprüngliche Nachricht-----\nVon: Support\n\
         Gesendet: Montag\nCustomer waiting:  2h\nWhy escalated:     stale",
    );
    let a = on_message(&mut case, &german, Role::Staff, None, &ctx);
    assert_eq!(
        a,
        vec![Action::Relay {
            text: "Der Drucker ist repariert.".into(),
            from: "tier2@example.test".into()
        }]
    );
    let unknown = mail(
        "tier2@example.test",
        "Re: x",
        "",
        "Done.\n\n=== original follows ===\nCustomer waiting:  2h\nNote from tier 1: VIP, be nice",
    );
    assert!(on_message(&mut case, &unknown, Role::Staff, None, &ctx).is_empty());
    assert!(case.new_events.iter().any(|e| matches!(
        &e.what,
        EventKind::RelayBlocked { reason, .. } if reason.contains("summary")
    )));
    // An HTML-only Outlook reply: cut at its quote container.
    let raw = "From: tier2@example.test\r\nSubject: RE: x\r\nMessage-ID: <h1@x>\r\n\
Content-Type: text/html; charset=utf-8\r\n\r\n<div>Replaced the fuser.</div>\
<div id=\"divRplyFwdMsg\"><b>From:</b> Support<br>Customer waiting: 2h</div>\r\n";
    let html = crate::message::parse(raw.as_bytes());
    let a = on_message(&mut case, &html, Role::Staff, None, &ctx);
    assert_eq!(
        a,
        vec![Action::Relay {
            text: "Replaced the fuser.".into(),
            from: "tier2@example.test".into()
        }]
    );
}

#[test]
fn auto_resolve_after_silence() {
    let c = config();
    let (mut case, _) = new_case(
        &c,
        at(MON_9),
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let ctx = Ctx {
        config: &c,
        now: at("2026-11-23T10:00:00Z"),
    };
    on_message(
        &mut case,
        &mail("agent@example.test", "Re", "", "done?"),
        Role::SupportAgent,
        None,
        &ctx,
    );
    assert_eq!(
        case.timer,
        Some(Timer {
            at: at("2026-11-28T10:00:00Z"),
            kind: TimerKind::AutoResolve
        })
    );
    let a = on_timer(
        &mut case,
        &Ctx {
            config: &c,
            now: at("2026-11-28T10:00:00Z"),
        },
    );
    assert_eq!(a, vec![Action::Survey]);
    assert_eq!(case.status, Status::Resolved);
}

#[test]
fn manual_escalation() {
    let c = config();
    let (mut case, _) = new_case(
        &c,
        at(MON_9),
        &mail("alice@example.org", "Printer", "", "help"),
        1,
    );
    let a = escalate_manually(
        &mut case,
        "VIP",
        &Ctx {
            config: &c,
            now: at(MON_9),
        },
    );
    assert!(matches!(
        a[0],
        Action::Forward {
            reason: Reason::Manual,
            ..
        }
    ));
    assert!(
        escalate_manually(
            &mut case,
            "again",
            &Ctx {
                config: &c,
                now: at(MON_9)
            }
        )
        .is_empty(),
        "top tier"
    );
}

#[test]
fn words_and_formats() {
    assert_eq!(eta_words(Duration::from_secs(4 * 3600)), "within 4 hours");
    assert_eq!(eta_words(Duration::from_secs(3600)), "within 1 hour");
    assert_eq!(
        eta_words(Duration::from_secs(90)),
        "within 1 minute 30 seconds"
    );
    assert_eq!(
        eta_words(Duration::from_secs(86_400 + 7200)),
        "within 1 day 2 hours"
    );
    assert_eq!(eta_words(Duration::from_secs(86_400 + 30)), "within 1 day");
    let tz: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    assert_eq!(
        format_eta(at("2026-07-01T12:00:00Z"), tz),
        "Wednesday, 1 July 2026, 14:00 CEST"
    );
    assert_eq!(csat_reply("5"), Some(5));
    assert_eq!(csat_reply("5!"), Some(5));
    assert_eq!(csat_reply("4/5"), Some(4));
    assert_eq!(csat_reply("5 ★★★★★"), Some(5));
    assert_eq!(
        csat_reply("3 stars\n\n-- \nBob\nACME Corp, 4th floor"),
        Some(3)
    );
    assert_eq!(
        csat_reply("5 - great, thank you!\nSent from my iPhone"),
        Some(5)
    );
    assert_eq!(csat_reply("4 - good"), Some(4));
    assert_eq!(csat_reply("10"), None);
    assert_eq!(csat_reply("6"), None);
    assert_eq!(
        csat_reply("thanks, 5 stars and more text that is long enough"),
        None
    );
}

#[test]
fn resolve_within_counts_only_time_waiting_on_staff() {
    let text = text()
        .replace("warn_before = \"30m\"", "resolve_within = \"6h\"")
        .replace(
            "first_response = \"4h\"\nfollow_up = \"8h\"",
            "first_response = \"4h\"\nfollow_up = \"4h\"",
        );
    let c = Config::parse(&text, Path::new("/x.toml")).unwrap();
    // Monday 10:00 CET: open; answered at 12:00 (2h open).
    let (mut case, _) = new_case(
        &c,
        at(MON_9),
        &mail("alice@example.org", "x", "", "help"),
        1,
    );
    let ctx = |s| Ctx {
        config: &c,
        now: at(s),
    };
    on_message(
        &mut case,
        &mail("agent@example.test", "Re", "", "try this"),
        Role::SupportAgent,
        None,
        &ctx("2026-11-23T11:00:00Z"),
    );
    assert_eq!(case.open_secs, 2 * 3600);
    // The customer takes a day to answer: that time does not count.
    on_message(
        &mut case,
        &mail("alice@example.org", "Re", "", "no luck"),
        Role::Customer,
        None,
        &ctx("2026-11-24T09:00:00Z"),
    );
    // 4h of the 6h are left from Tuesday 10:00 CET; the 4h follow-up
    // deadline ends at the same moment, 14:00 CET.
    assert_eq!(case.timer.unwrap().at, at("2026-11-24T13:00:00Z"));
    // A second answer at 11:00 CET (1h more open) and a reply at 12:00:
    on_message(
        &mut case,
        &mail("agent@example.test", "Re", "", "and this"),
        Role::SupportAgent,
        None,
        &ctx("2026-11-24T10:00:00Z"),
    );
    assert_eq!(case.open_secs, 3 * 3600);
    on_message(
        &mut case,
        &mail("alice@example.org", "Re", "", "still"),
        Role::Customer,
        None,
        &ctx("2026-11-24T11:00:00Z"),
    );
    // 3h left of resolve_within from 12:00 CET → 15:00 CET, before the
    // follow-up deadline at 16:00 CET.
    assert_eq!(
        case.timer,
        Some(Timer {
            at: at("2026-11-24T14:00:00Z"),
            kind: TimerKind::ResolveDue
        })
    );
    let a = on_timer(&mut case, &ctx("2026-11-24T14:00:00Z"));
    assert!(
        matches!(&a[0], Action::Forward { reason: Reason::Stale, detail, .. } if detail.contains("not resolved within 6h")),
        "{a:?}"
    );
    assert_eq!(case.tier, "Tier 2");
}

/// The policy config with two queues: `support` on every tier, and
/// `billing` on "Billing" then "Tier 2" (skipping Frontline).
fn queues_config() -> Config {
    let text = text()
        .replace("[mailbox]\n", "[[mailboxes]]\nname = \"support\"\n")
        .replace(
            "[smtp]\n",
            "[[mailboxes]]\nname = \"billing\"\naddress = \"Billing <billing@example.test>\"\n\
             tiers = [\"Billing\", \"Tier 2\"]\nhost = \"127.0.0.1\"\nsecurity = \"plain\"\n\
             username = \"b\"\npassword = \"p\"\n[smtp]\n",
        )
        .replace(
            "[repeat_customer]",
            "[[tiers]]\nname = \"Billing\"\nforward_to = [\"bill@example.test\"]\n\
             first_response = \"2h\"\n[repeat_customer]",
        );
    Config::parse(&text, Path::new("/x.toml")).unwrap()
}

#[test]
fn a_queue_escalates_along_its_own_path_and_speaks_with_its_own_address() {
    let c = queues_config();
    let now = at(MON_9);
    let m = mail("alice@example.org", "Invoice", "", "wrong amount");
    let mut case = open_case(9, &m, &c, "billing", now);
    assert_eq!(
        (case.queue.as_str(), case.tier.as_str()),
        ("billing", "Billing")
    );
    let ctx = Ctx { config: &c, now };
    on_new_case(&mut case, &m, None, 1, &ctx);
    let (subject, body) = ack_text(&case, case.due_at.unwrap(), &c, now);
    assert!(subject.contains("Invoice"));
    assert!(!body.contains("support@example.test"), "{body}");
    // Stale at Billing: up to Tier 2, the next on billing's path (not
    // Frontline, which comes first in the config).
    let later = case.timer.unwrap().at;
    let mut fired = Vec::new();
    let mut t = later;
    while case.tier == "Billing" {
        let ctx = Ctx { config: &c, now: t };
        fired.extend(on_timer(&mut case, &ctx));
        t = case.timer.map(|x| x.at).unwrap_or(t);
    }
    assert_eq!(case.tier, "Tier 2");
    let forward = fired.iter().find_map(|a| match a {
        Action::Forward { tier, .. } => Some(*tier),
        _ => None,
    });
    assert_eq!(forward.map(|i| c.tiers[i].name.as_str()), Some("Tier 2"));
    // Tier 2 is billing's last: its deadline breaches, nothing further.
    let ctx = Ctx {
        config: &c,
        now: case.due_at.unwrap() + chrono::Duration::minutes(1),
    };
    case.timer = Some(Timer {
        at: case.due_at.unwrap(),
        kind: TimerKind::Due,
    });
    on_timer(&mut case, &ctx);
    assert!(case.breached && case.tier == "Tier 2");
    // A support case goes Frontline → Tier 2 → Billing (config order).
    let mut s = open_case(10, &m, &c, "support", now);
    assert_eq!(s.tier, "Frontline");
    let ctx = Ctx { config: &c, now };
    assert_eq!(ctx.next_tier(&s), Some(1));
    s.tier = "Tier 2".into();
    assert_eq!(ctx.next_tier(&s), Some(2));
    // Manual escalation follows the path too; at its end it does nothing.
    let mut b = open_case(11, &m, &c, "billing", now);
    escalate_manually(&mut b, "by hand", &ctx);
    assert_eq!(b.tier, "Tier 2");
    assert!(escalate_manually(&mut b, "again", &ctx).is_empty());
    assert_eq!(b.tier, "Tier 2");
}

#[test]
fn a_repeat_customer_tier_off_a_queues_path_is_not_used_there() {
    // repeat_customer.tier is "Tier 2". On billing's path it is above
    // Billing, so billing's repeat customers go there.
    let c = queues_config();
    let now = at(MON_9);
    let m = mail("bob@example.org", "Again", "", "third time");
    let mut case = open_case(12, &m, &c, "billing", now);
    let ctx = Ctx { config: &c, now };
    on_new_case(&mut case, &m, None, 3, &ctx);
    assert_eq!(case.tier, "Tier 2");
    assert!(case.repeat_customer);
    // A billing path of Billing alone: Tier 2 is not on it, and a case
    // never leaves its queue's path for it.
    let text = text()
        .replace("[mailbox]\n", "[[mailboxes]]\nname = \"billing\"\ntiers = [\"Billing\"]\n")
        .replace(
            "[repeat_customer]",
            "[[tiers]]\nname = \"Billing\"\nforward_to = [\"bill@example.test\"]\nfirst_response = \"2h\"\n[repeat_customer]",
        );
    let c2 = Config::parse(&text, Path::new("/x.toml")).unwrap();
    let mut d = open_case(13, &m, &c2, "billing", now);
    let ctx = Ctx { config: &c2, now };
    let actions = on_new_case(&mut d, &m, None, 3, &ctx);
    assert!(d.repeat_customer, "still marked as a repeat customer");
    assert_eq!(d.tier, "Billing");
    assert!(!actions.iter().any(|a| matches!(a, Action::Forward { .. })));
}
