//! Policy: what a message, a timer or a person's command means for a case
//! (status, tier, deadline) and which mails it causes. Pure: the config
//! and `now` are arguments, so every rule is tested with a fake clock.
//!
//! A waiting case has one deadline (`due_at`) and one timer (`timer`):
//! the reminder before the deadline, the deadline itself, the top tier's
//! re-notification, or auto-resolution. The store indexes the timer by
//! time, so the scheduler wakes only for cases that are due.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::case::{Case, EventKind, Reason, Status, Timer, TimerKind};
use crate::config::{Config, TierConfig, WarnBefore};
use crate::message::InboundMail;
use crate::suppress::Suppress;

/// A mail the policy wants sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The acknowledgement of a new case (names its tier and ETA).
    Ack { eta: DateTime<Utc> },
    /// Tells the customer who has the case now, and the new ETA.
    Notice { eta: DateTime<Utc> },
    /// The case with its whole history, to a tier's `forward_to`.
    Forward {
        tier: usize,
        /// The tier it comes from.
        previous: String,
        reason: Reason,
        detail: String,
    },
    /// A staff reply passed on to the customer from the support address.
    Relay { text: String, from: String },
    /// A reminder to the tier before its deadline.
    Warn { tier: usize },
    /// The top tier is told again about a breached case.
    Renotify { tier: usize },
    /// The satisfaction question after resolution.
    Survey,
}

/// Who wrote a message, as far as the case is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Customer,
    /// Someone the customer had in To/Cc.
    Participant,
    /// From a staff address, verified: it answers a staff-facing mail
    /// escalator sent for this case (and passed DKIM when that is
    /// required). Its text is passed on and its commands obeyed.
    Staff,
    /// From a staff address, or the support address seen in the inbox,
    /// without that proof: a person answering the customer directly with
    /// support in Cc, or one message in both INBOX and Sent. Recorded;
    /// stops the clock when `stops_clock` (DKIM passed, if required), and
    /// is never passed on or obeyed.
    UnverifiedStaff {
        stops_clock: bool,
    },
    /// From the shared support mailbox's Sent folder: an agent's answer.
    SupportAgent,
    /// Anyone else (the support address seen in the inbox, robots).
    Other,
}

/// Everything a rule needs besides the case.
pub struct Ctx<'a> {
    pub config: &'a Config,
    pub now: DateTime<Utc>,
}

impl Ctx<'_> {
    fn tier_index(&self, name: &str) -> usize {
        tier_index(self.config, name)
    }

    /// The case's escalation path: its queue's tiers (indexes into the
    /// config's), in order.
    fn path(&self, case: &Case) -> &[usize] {
        &self.config.queue(&case.queue).path
    }

    /// The tier after the case's on its path (for a case whose tier is
    /// off its path, moved by hand or by a config change: the first of
    /// the path that comes after it in config order).
    fn next_tier(&self, case: &Case) -> Option<usize> {
        let path = self.path(case);
        let idx = self.tier_index(&case.tier);
        match path.iter().position(|&i| i == idx) {
            Some(p) => path.get(p + 1).copied(),
            None => path.iter().copied().find(|&i| i > idx),
        }
    }

    /// Is tier `target` on the case's path, above the case's tier?
    fn is_above(&self, case: &Case, target: usize) -> bool {
        let path = self.path(case);
        let idx = self.tier_index(&case.tier);
        let Some(t) = path.iter().position(|&i| i == target) else {
            return false;
        };
        match path.iter().position(|&i| i == idx) {
            Some(p) => t > p,
            None => target > idx,
        }
    }
    fn calendar_add(&self, from: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
        self.config.calendar.business.add(from, d)
    }
}

/// The index of a tier by name (the first if the config lost it).
pub fn tier_index(config: &Config, name: &str) -> usize {
    config
        .tiers
        .iter()
        .position(|t| t.name == name)
        .unwrap_or(0)
}

/// Opens a new case of `queue` from its first message, at the first tier
/// of the queue's path.
pub fn open_case(
    id: u64,
    mail: &InboundMail,
    config: &Config,
    queue: &str,
    now: DateTime<Utc>,
) -> Case {
    let q = config.queue(queue);
    let first = q.path.first().copied().unwrap_or(0);
    let customer = mail
        .from
        .as_ref()
        .map(|a| a.email.clone())
        .unwrap_or_default();
    let subject = crate::thread::clean_subject(&mail.subject, &config.cases.subject_tag);
    let subject = if subject.is_empty() {
        "(no subject)".to_string()
    } else {
        subject
    };
    let mut case = Case::new(
        id,
        &customer,
        &subject,
        &config.tiers[first].name,
        &mail.message_id,
        now,
    );
    case.queue = q.name.clone();
    case.customer_name = mail.from.as_ref().and_then(|a| a.name.clone());
    case.push(
        now,
        EventKind::Created {
            message_id: mail.message_id.clone(),
            from: customer,
        },
    );
    case
}

/// Starts (or restarts) the customer's wait at the current tier.
fn start_wait(case: &mut Case, first: bool, since: DateTime<Utc>, ctx: &Ctx) {
    let t = &ctx.config.tiers[ctx.tier_index(&case.tier)];
    let tl = t.timeline(case.priority.as_deref());
    let wait = if first {
        tl.first_response
    } else {
        tl.follow_up
    };
    set_status(case, Status::Open, ctx);
    if case.waiting_since.is_none() {
        case.waiting_since = Some(since);
    }
    set_deadline(case, ctx.now, wait, t, ctx);
}

/// Sets `due_at` = `from` + `wait` in business time, and the reminder.
fn set_deadline(case: &mut Case, from: DateTime<Utc>, wait: Duration, t: &TierConfig, ctx: &Ctx) {
    let due = ctx.calendar_add(from, wait);
    case.due_at = Some(due);
    case.breached = false;
    case.warn_at = t.warn_before.and_then(|w| {
        let lead = match w {
            WarnBefore::Before(d) => wait.checked_sub(d)?,
            WarnBefore::Percent(p) => wait.mul_f64(f64::from(p) / 100.0),
        };
        let at = ctx.calendar_add(from, lead);
        (at > ctx.now && at < due).then_some(at)
    });
    set_timer(case, ctx);
}

/// Changes status, keeping count of the time the case spent open
/// (waiting on staff), which is what `resolve_within` limits.
fn set_status(case: &mut Case, status: Status, ctx: &Ctx) {
    if case.status == Status::Open && status != Status::Open {
        if let Some(since) = case.open_since.take() {
            case.open_secs += ctx
                .config
                .calendar
                .business
                .between(since, ctx.now)
                .as_secs();
        }
    }
    if status == Status::Open && case.open_since.is_none() {
        case.open_since = Some(ctx.now);
    }
    case.status = status;
}

/// When the tier's `resolve_within` runs out, if it applies.
fn resolve_deadline(case: &Case, ctx: &Ctx) -> Option<DateTime<Utc>> {
    let t = &ctx.config.tiers[ctx.tier_index(&case.tier)];
    let limit = t.resolve_within?;
    if case.resolve_fired.as_deref() == Some(t.name.as_str()) {
        return None;
    }
    let left = limit.saturating_sub(Duration::from_secs(case.open_secs));
    Some(ctx.calendar_add(case.open_since?, left))
}

/// Picks the case's next timer from its state.
pub fn set_timer(case: &mut Case, ctx: &Ctx) {
    case.timer = match case.status {
        Status::Resolved => None,
        Status::Answered => ctx.config.resolution.auto_resolve_after.and_then(|d| {
            let since = case.answered_at?;
            Some(Timer {
                at: since + chrono::Duration::from_std(d).ok()?,
                kind: TimerKind::AutoResolve,
            })
        }),
        Status::Open => match (case.due_at, case.breached) {
            (None, _) => None,
            (Some(_), true) => case.timer.filter(|t| t.kind == TimerKind::Renotify),
            (Some(due), false) => {
                let mut t = Timer {
                    at: due,
                    kind: TimerKind::Due,
                };
                if let Some(w) = case.warn_at.filter(|w| *w < due) {
                    t = Timer {
                        at: w,
                        kind: TimerKind::Warn,
                    };
                }
                match resolve_deadline(case, ctx) {
                    Some(r) if r < t.at => Some(Timer {
                        at: r,
                        kind: TimerKind::ResolveDue,
                    }),
                    _ => Some(t),
                }
            }
        },
    };
}

/// The first message of a new case. `recent_cases` counts the
/// customer's cases within `repeat_customer.within`, this one included.
pub fn on_new_case(
    case: &mut Case,
    mail: &InboundMail,
    suppress: Option<&Suppress>,
    recent_cases: usize,
    ctx: &Ctx,
) -> Vec<Action> {
    add_participants(case, mail, ctx.config);
    if let Some(s) = suppress {
        // Robots and unreadable senders wait for nobody: no deadline.
        case.waiting_since = None;
        case.push(
            ctx.now,
            EventKind::AckSuppressed {
                reason: s.to_string(),
                limit: None,
            },
        );
        return Vec::new();
    }
    if case.customer.is_empty() {
        case.waiting_since = None;
        return Vec::new();
    }
    case.unanswered = 1;
    start_wait(case, true, ctx.now, ctx);
    let mut actions = Vec::new();
    if let Some(r) = &ctx.config.repeat_customer {
        case.repeat_customer = recent_cases >= r.cases as usize;
        if case.repeat_customer && ctx.is_above(case, r.tier) {
            let detail = format!(
                "case {} of this customer within {}",
                recent_cases,
                humantime::format_duration(r.within)
            );
            actions.extend(escalate_to(
                case,
                r.tier,
                Reason::RepeatCustomer,
                &detail,
                false,
                ctx,
            ));
        }
    }
    actions.extend(apply_triggers(case, mail, false, ctx));
    let eta = case.due_at.unwrap_or(ctx.now);
    actions.insert(0, Action::Ack { eta });
    actions
}

/// Is this customer message on a resolved case a new matter, to be a new
/// case linked to the old one (past `reopen_within`, and not a rating)?
pub fn starts_follow_on_case(case: &Case, mail: &InboundMail, ctx: &Ctx) -> bool {
    if case.status != Status::Resolved {
        return false;
    }
    if case.survey_sent && csat_reply(&new_text(&mail.text)).is_some() {
        return false;
    }
    let resolved = case.resolved_at.unwrap_or(case.updated_at);
    let window = chrono::Duration::from_std(ctx.config.resolution.reopen_within)
        .unwrap_or(chrono::Duration::MAX);
    ctx.now - resolved > window
}

/// A later message in an existing case.
pub fn on_message(
    case: &mut Case,
    mail: &InboundMail,
    role: Role,
    suppress: Option<&Suppress>,
    ctx: &Ctx,
) -> Vec<Action> {
    let automatic = suppress.is_some_and(Suppress::is_automatic);
    let sender = mail
        .from
        .as_ref()
        .map(|a| a.email.clone())
        .unwrap_or_default();
    match role {
        Role::UnverifiedStaff { stops_clock } => {
            case.push(
                ctx.now,
                EventKind::UnverifiedStaff {
                    from: sender,
                    message_id: mail.message_id.clone(),
                },
            );
            // A note is no answer, verified or not.
            if stops_clock && !automatic && !is_note(&new_text(&mail.text)) {
                mark_answered(case, ctx);
            }
            Vec::new()
        }
        Role::Staff | Role::SupportAgent if !automatic => {
            staff_message(case, mail, role, sender, ctx)
        }
        Role::Customer | Role::Participant if !automatic => {
            if role == Role::Customer {
                add_participants(case, mail, ctx.config);
            }
            case.last_message_id = mail.message_id.clone();
            customer_message(case, mail, ctx)
        }
        _ => Vec::new(),
    }
}

fn staff_message(
    case: &mut Case,
    mail: &InboundMail,
    role: Role,
    from: String,
    ctx: &Ctx,
) -> Vec<Action> {
    let text = reply_text(mail);
    if is_note(&text) {
        case.push(
            ctx.now,
            EventKind::Note {
                from,
                message_id: mail.message_id.clone(),
            },
        );
        return Vec::new();
    }
    let resolve = text
        .lines()
        .any(|l| l.trim().eq_ignore_ascii_case("#resolve"));
    let relay_text: String = text
        .lines()
        .filter(|l| !l.trim().eq_ignore_ascii_case("#resolve"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string();
    case.push(
        ctx.now,
        EventKind::StaffAnswer {
            from: from.clone(),
            message_id: mail.message_id.clone(),
        },
    );
    let mut actions = Vec::new();
    // An agent's answer from the shared mailbox already went to the
    // customer; a tier's reply to a forward has to be passed on.
    if role != Role::SupportAgent && !relay_text.is_empty() && !case.customer.is_empty() {
        // Anything of the forward still in it (a client whose quoting we
        // could not cut): nothing goes out, the case keeps waiting, and
        // the history says why.
        if let Some(reason) = crate::quote::leaks(&relay_text) {
            case.push(
                ctx.now,
                EventKind::RelayBlocked {
                    from,
                    message_id: mail.message_id.clone(),
                    reason,
                },
            );
            return Vec::new();
        }
        actions.push(Action::Relay {
            text: relay_text,
            from: from.clone(),
        });
    }
    mark_answered(case, ctx);
    if resolve {
        actions.extend(resolve_case(case, &from, ctx));
    }
    actions
}

/// Is this staff text an internal note (first line `#note`)?
fn is_note(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .is_some_and(|l| l.eq_ignore_ascii_case("#note"))
}

/// A staff answer stops the clock: the case waits for the customer.
fn mark_answered(case: &mut Case, ctx: &Ctx) {
    if case.status == Status::Resolved {
        return;
    }
    set_status(case, Status::Answered, ctx);
    case.answered_at = Some(ctx.now);
    case.first_answer_at.get_or_insert(ctx.now);
    case.unanswered = 0;
    case.waiting_since = None;
    case.due_at = None;
    case.warn_at = None;
    case.breached = false;
    set_timer(case, ctx);
}

fn customer_message(case: &mut Case, mail: &InboundMail, ctx: &Ctx) -> Vec<Action> {
    let text = new_text(&mail.text);
    match case.status {
        Status::Resolved => {
            if case.survey_sent && case.csat.is_none() {
                if let Some(score) = csat_reply(&text) {
                    case.csat = Some(score);
                    case.push(ctx.now, EventKind::Csat { score });
                    return Vec::new();
                }
            }
            case.push(
                ctx.now,
                EventKind::Reopened {
                    message_id: mail.message_id.clone(),
                },
            );
            case.resolved_at = None;
            case.unanswered = 1;
            case.waiting_since = None;
            start_wait(case, false, ctx.now, ctx);
        }
        Status::Answered => {
            case.unanswered = 1;
            case.waiting_since = None;
            start_wait(case, false, ctx.now, ctx);
        }
        Status::Open => {
            case.unanswered += 1;
            if case.waiting_since.is_none() {
                start_wait(case, true, ctx.now, ctx);
            }
        }
    }
    let mut actions = apply_triggers(case, mail, true, ctx);
    if let Some(r) = &ctx.config.repeat_customer {
        if let Some(m) = r.unanswered {
            if case.unanswered >= m && ctx.is_above(case, r.tier) {
                let detail = format!("{} customer messages unanswered", case.unanswered);
                actions.extend(escalate_to(
                    case,
                    r.tier,
                    Reason::RepeatCustomer,
                    &detail,
                    true,
                    ctx,
                ));
            }
        }
    }
    actions
}

/// Triggers on a customer message: escalate one tier, or set priority.
fn apply_triggers(case: &mut Case, mail: &InboundMail, notify: bool, ctx: &Ctx) -> Vec<Action> {
    let mut actions = Vec::new();
    for (why, escalate, priority) in match_triggers(mail, ctx.config) {
        if let Some(p) = priority {
            if case.priority.as_deref() != Some(p.as_str()) {
                case.priority = Some(p.clone());
                case.push(
                    ctx.now,
                    EventKind::Priority {
                        priority: p,
                        why: why.clone(),
                    },
                );
                // The priority's timeline applies from now if it is sooner.
                if case.status == Status::Open {
                    let t = &ctx.config.tiers[ctx.tier_index(&case.tier)];
                    let wait = t.timeline(case.priority.as_deref()).first_response;
                    let due = ctx.calendar_add(ctx.now, wait);
                    if case.due_at.is_none_or(|d| due < d) {
                        set_deadline(case, ctx.now, wait, t, ctx);
                    }
                }
            }
        }
        if escalate {
            if let Some(next) = ctx.next_tier(case) {
                actions.extend(escalate_to(case, next, Reason::Trigger, &why, notify, ctx));
            }
        }
    }
    actions
}

/// The triggers a message sets off: (why, escalate, priority).
pub fn match_triggers(mail: &InboundMail, config: &Config) -> Vec<(String, bool, Option<String>)> {
    let subject = mail.subject.to_lowercase();
    let body = new_text(&mail.text).to_lowercase();
    let sender = mail.from.as_ref().map(|a| a.email.as_str()).unwrap_or("");
    let mut out = Vec::new();
    for t in &config.triggers {
        let phrase = t
            .phrases
            .iter()
            .find(|p| contains_phrase(&subject, p) || contains_phrase(&body, p))
            .map(|p| format!("phrase \"{p}\""));
        let who = t
            .senders
            .iter()
            .find(|s| match s.strip_prefix('@') {
                Some(d) => sender.rsplit_once('@').is_some_and(|(_, sd)| sd == d),
                None => *s == sender,
            })
            .map(|s| format!("sender {s}"));
        let header = t
            .headers
            .iter()
            .find(|(name, value)| {
                mail.headers.iter().any(|(n, v)| {
                    let v = v.to_ascii_lowercase();
                    n == name
                        && (v == *value
                            || v.strip_prefix(value.as_str()).is_some_and(|rest| {
                                !rest.starts_with(|c: char| c.is_alphanumeric())
                            }))
                })
            })
            .map(|(n, v)| format!("header {n}: {v}"));
        if let Some(why) = phrase.or(who).or(header) {
            out.push((why, t.escalate, t.priority.clone()));
        }
    }
    out
}

/// A whole-word, case-insensitive match ("manager" not in "management").
fn contains_phrase(hay: &str, phrase: &str) -> bool {
    let mut from = 0;
    while let Some(i) = hay[from..].find(phrase) {
        let start = from + i;
        let end = start + phrase.len();
        let before = hay[..start].chars().next_back();
        let after = hay[end..].chars().next();
        if !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric) {
            return true;
        }
        from = start + phrase.len().max(1);
        while from < hay.len() && !hay.is_char_boundary(from) {
            from += 1;
        }
    }
    false
}

/// The text a person wrote now: quoted earlier mail left out (see
/// [`crate::quote`]).
pub fn new_text(body: &str) -> String {
    crate::quote::new_text(body)
}

/// The new text of a message: from its HTML with the quote containers
/// cut, when it has only HTML; from its text otherwise.
pub fn reply_text(mail: &InboundMail) -> String {
    match &mail.html_reply {
        Some(text) => text.clone(),
        None => new_text(&mail.text),
    }
}

/// Words a rating may carry besides its number ("5 - great", "4 stars",
/// "5 (sehr gut)", "4 sur 5"), in the languages of the built-in surveys:
/// their own scale words are all here (`policy::tests` checks each).
#[rustfmt::skip]
const RATING_WORDS: &[&str] = &[
    "great", "good", "ok", "okay", "fine", "poor", "bad", "excellent", "perfect", "awesome",
    "thanks", "thank", "you", "thx", "star", "stars", "points", "of", "out", "super", "very",
    "much", "many",
    "gut", "sehr", "schlecht", "danke", "vielen", "dank", "stern", "sterne", "von", "punkte",
    "perfekt", "prima", "toll",
    "merci", "beaucoup", "mauvais", "très", "bien", "bon", "parfait", "étoile", "étoiles", "sur",
    "gracias", "muchas", "mala", "malo", "excelente", "muy", "bueno", "buena", "perfecto",
    "estrella", "estrellas", "puntos", "de", "sobre",
    "grazie", "mille", "scarso", "ottimo", "molto", "bene", "buono", "perfetto", "eccellente",
    "stella", "stelle", "punti", "su", "di",
    "bedankt", "slecht", "uitstekend", "goed", "zeer", "heel", "ster", "sterren",
    "punten", "van", "uit",
    "obrigado", "obrigada", "fraco", "muito", "bom", "boa", "ótimo", "otimo", "perfeito",
    "estrela", "estrelas", "pontos", "em",
];

/// A phone's signature line ("Sent from my iPhone", "Von meinem iPhone
/// gesendet"): the opening words in the languages of the built-in
/// surveys, and, except for the English one the product always read,
/// a device named in a short line, so "Von meinem Konto wurde doppelt
/// abgebucht" stays the customer's text.
const MOBILE_SIGNATURES: &[&str] = &[
    "von meinem ",
    "gesendet von ",
    "envoyé de mon ",
    "enviado desde mi ",
    "enviado do meu ",
    "inviato da ",
    "verzonden vanaf ",
    "verstuurd vanaf ",
];
const DEVICES: &[&str] = &[
    "iphone",
    "ipad",
    "android",
    "samsung",
    "galaxy",
    "pixel",
    "huawei",
    "xiaomi",
    "handy",
    "smartphone",
    "mobil",
    "telefoon",
    "téléphone",
    "teléfono",
    "telefone",
    "telefono",
    "outlook",
    "gmail",
    "tablet",
    "blackberry",
];

/// Is `line` (lower case, trimmed) a phone's signature line?
fn mobile_signature(line: &str) -> bool {
    line.starts_with("sent from my ")
        || (line.chars().count() <= 60
            && MOBILE_SIGNATURES.iter().any(|m| line.starts_with(m))
            && DEVICES.iter().any(|d| line.contains(d)))
}

/// "5", "5!", "4/5", "5 ★★★★★", "4 - good": a satisfaction rating. The
/// whole new text (signature cut) must be just that: "3rd floor printer
/// still jams!" is a follow-up, not a 3.
pub fn csat_reply(text: &str) -> Option<u8> {
    let mut lines = without_signature(text)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty());
    let line = lines.next()?;
    if lines.next().is_some() || line.chars().count() > 40 {
        return None;
    }
    let mut chars = line.chars();
    let d = chars.next()?.to_digit(10)?;
    if !(1..=5).contains(&d) {
        return None;
    }
    let rest = chars.as_str().to_lowercase();
    let rest = rest.trim_start();
    let rest = match rest.strip_prefix('/') {
        Some(r) => r.trim_start().strip_prefix('5')?,
        None => rest,
    };
    // Any punctuation splits words: an en dash from Word's AutoFormat,
    // guillemets, stars.
    let words_ok = rest
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .all(|w| RATING_WORDS.contains(&w) || w == "5");
    let no_digits_but_five = rest
        .split(|c: char| !c.is_ascii_digit())
        .all(|n| n.is_empty() || n == "5");
    (words_ok && no_digits_but_five).then_some(d as u8)
}

/// The text above a signature separator (`-- `) or a mobile client's
/// "Sent from my ..." line.
fn without_signature(text: &str) -> &str {
    let mut end = text.len();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_end_matches(['\r', '\n']);
        let lower = t.trim().to_lowercase();
        if t == "-- " || t == "--" || mobile_signature(&lower) {
            end = at;
            break;
        }
        at += line.len();
    }
    &text[..end]
}

/// Moves the case up its path to tier `target`, with a forward and (if
/// `notify`) a notice to the customer.
pub fn escalate_to(
    case: &mut Case,
    target: usize,
    reason: Reason,
    detail: &str,
    notify: bool,
    ctx: &Ctx,
) -> Vec<Action> {
    if target >= ctx.config.tiers.len() || !ctx.is_above(case, target) {
        return Vec::new();
    }
    let t = &ctx.config.tiers[target];
    let from_name = case.tier.clone();
    case.tier = t.name.clone();
    case.escalations += 1;
    set_status(case, Status::Open, ctx);
    if case.waiting_since.is_none() {
        case.waiting_since = Some(ctx.now);
    }
    let wait = t.timeline(case.priority.as_deref()).first_response;
    set_deadline(case, ctx.now, wait, t, ctx);
    case.push(
        ctx.now,
        EventKind::Escalated {
            from: from_name.clone(),
            to: t.name.clone(),
            reason,
            detail: detail.to_string(),
        },
    );
    let mut actions = vec![Action::Forward {
        tier: target,
        previous: from_name,
        reason,
        detail: detail.to_string(),
    }];
    if notify && !case.customer.is_empty() {
        actions.push(Action::Notice {
            eta: case.due_at.unwrap_or(ctx.now),
        });
    }
    actions
}

/// A person escalates by hand (`escalator cases escalate`).
pub fn escalate_manually(case: &mut Case, why: &str, ctx: &Ctx) -> Vec<Action> {
    match ctx.next_tier(case) {
        Some(next) => escalate_to(case, next, Reason::Manual, why, true, ctx),
        None => Vec::new(),
    }
}

/// Resolves the case; the survey goes out once.
pub fn resolve_case(case: &mut Case, by: &str, ctx: &Ctx) -> Vec<Action> {
    if case.status == Status::Resolved {
        return Vec::new();
    }
    set_status(case, Status::Resolved, ctx);
    case.resolved_at = Some(ctx.now);
    case.waiting_since = None;
    case.due_at = None;
    case.warn_at = None;
    case.push(ctx.now, EventKind::Resolved { by: by.to_string() });
    set_timer(case, ctx);
    if ctx.config.resolution.survey && !case.survey_sent && !case.customer.is_empty() {
        case.survey_sent = true;
        return vec![Action::Survey];
    }
    Vec::new()
}

/// The case's timer fired (the scheduler calls this once it is due).
pub fn on_timer(case: &mut Case, ctx: &Ctx) -> Vec<Action> {
    let Some(timer) = case.timer else {
        return Vec::new();
    };
    if timer.at > ctx.now {
        return Vec::new();
    }
    let idx = ctx.tier_index(&case.tier);
    let next = ctx.next_tier(case);
    match timer.kind {
        TimerKind::Warn => {
            case.warn_at = None;
            case.push(
                ctx.now,
                EventKind::Warned {
                    tier: case.tier.clone(),
                },
            );
            set_timer(case, ctx);
            vec![Action::Warn { tier: idx }]
        }
        TimerKind::Due if next.is_some() => {
            let waited = case
                .waiting_since
                .map(|w| ctx.config.calendar.business.between(w, ctx.now))
                .unwrap_or_default();
            let detail = format!(
                "no staff answer at {} within its deadline (waited {} of business time)",
                case.tier,
                humantime::format_duration(Duration::from_secs(waited.as_secs()))
            );
            match next {
                Some(n) => escalate_to(case, n, Reason::Stale, &detail, true, ctx),
                None => Vec::new(),
            }
        }
        TimerKind::ResolveDue => {
            let t = &ctx.config.tiers[idx];
            case.resolve_fired = Some(t.name.clone());
            let detail = format!(
                "not resolved within {} at {}",
                humantime::format_duration(t.resolve_within.unwrap_or_default()),
                t.name
            );
            match next {
                Some(n) => escalate_to(case, n, Reason::Stale, &detail, true, ctx),
                None => breach(case, idx, ctx),
            }
        }
        TimerKind::Due => breach(case, idx, ctx),
        TimerKind::Renotify => {
            case.push(
                ctx.now,
                EventKind::Renotified {
                    tier: case.tier.clone(),
                },
            );
            renotify(case, idx, ctx)
        }
        TimerKind::AutoResolve => resolve_case(case, "auto_resolve_after", ctx),
    }
}

/// The top tier's deadline passed: mark it and start re-notifying.
fn breach(case: &mut Case, idx: usize, ctx: &Ctx) -> Vec<Action> {
    case.breached = true;
    case.push(
        ctx.now,
        EventKind::Breached {
            tier: case.tier.clone(),
        },
    );
    renotify(case, idx, ctx)
}

fn renotify(case: &mut Case, idx: usize, ctx: &Ctx) -> Vec<Action> {
    let every = ctx.config.tiers[idx].renotify;
    case.timer = Some(Timer {
        at: ctx.now + chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX),
        kind: TimerKind::Renotify,
    });
    vec![Action::Renotify { tier: idx }]
}

fn add_participants(case: &mut Case, mail: &InboundMail, config: &Config) {
    let sender = mail.from.as_ref().map(|a| a.email.as_str()).unwrap_or("");
    if sender != case.customer || sender.is_empty() {
        return;
    }
    // People the customer copies in become participants, so their
    // replies join this case instead of opening duplicates. Support and
    // staff addresses never do.
    let support = config.support_addresses();
    for a in mail.to.iter().chain(mail.cc.iter()) {
        if a.email != case.customer
            && !support.contains(&a.email)
            && !config.tiers.iter().any(|t| t.is_staff(&a.email))
            && !case.participants.contains(&a.email)
        {
            case.participants.push(a.email.clone());
        }
    }
}

/// "within 4 hours", "within 1 day 2 hours": the two largest units.
pub fn eta_words(d: Duration) -> String {
    crate::locale::eta_words(d, false, "en")
}

/// The ETA as people read it, in the support team's time zone.
pub fn format_eta(at: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    crate::locale::format_eta(at, tz, "en")
}

#[cfg(test)]
mod tests;
