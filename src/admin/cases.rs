//! Admin requests about cases: list, show (text and JSON), escalate,
//! resolve, re-arm a parked timer.

use super::*;

pub(super) fn list_cases(
    shared: &Handle,
    as_json: bool,
    queue: &Option<String>,
) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let cases: Vec<Case> = store
        .cases()
        .filter(|c| match (queue, c) {
            (Some(q), Ok(c)) => &c.queue == q,
            _ => true,
        })
        .collect::<Result<_, _>>()?;
    if as_json {
        let config = shared.config.get();
        let v: Vec<_> = cases.iter().map(|c| case_json(&config, c)).collect();
        return Ok(Response::ok(json(&v)));
    }
    // With several queues, the tier column names the queue too.
    let several = shared.config.get().queues.len() > 1;
    let mut out = format!(
        "{:>6}  {:<8}  {:<12}  {:<20}  {:<28}  {}\n",
        "CASE",
        "STATUS",
        if several { "QUEUE/TIER" } else { "TIER" },
        "DUE",
        "CUSTOMER",
        "SUBJECT"
    );
    for c in &cases {
        let tier = if several {
            format!("{}/{}", c.queue, c.tier)
        } else {
            c.tier.clone()
        };
        out.push_str(&format!(
            "{:>6}  {:<8}  {:<12}  {:<20}  {:<28}  {}\n",
            c.id,
            serde_json::to_value(c.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            tier,
            match (&c.parked_timer, c.due_at) {
                (Some(_), _) => "timer parked!".to_string(),
                (None, Some(d)) => d.format("%Y-%m-%d %H:%M UTC").to_string(),
                (None, None) => "-".into(),
            },
            if c.customer.is_empty() {
                "(unassigned)".to_string()
            } else {
                printable(&c.customer)
            },
            printable(&c.subject)
        ));
    }
    out.push_str(&format!("{} case(s)\n", cases.len()));
    Ok(Response::ok(out))
}

/// A case's JSON summary with the language its customer's mail is in
/// and where that came from (a case from before languages were chosen:
/// its queue's or the default).
fn case_json(config: &crate::config::Config, case: &Case) -> serde_json::Value {
    let mut v = case.summary_json();
    let (language, source) = crate::mailtext::language_and_source(config, case);
    v["language"] = language.into();
    v["language_source"] = source.into();
    v
}

/// `cases show --json`: the case's summary with its bounces, history and
/// messages (their text from the stored bytes).
fn show_json(
    config: &crate::config::Config,
    case: &Case,
    bounces: Vec<serde_json::Value>,
    history: &[crate::case::Event],
    messages: &[(crate::record::MessageRecord, String)],
) -> serde_json::Value {
    let mut v = case_json(config, case);
    v["bounces"] = serde_json::Value::Array(bounces);
    v["history"] = serde_json::to_value(history).unwrap_or_default();
    v["message_list"] = serde_json::to_value(
        messages
            .iter()
            .map(|(m, text)| {
                serde_json::json!({
                    "seq": m.seq,
                    "message_id": m.message_id,
                    "from": m.from.as_ref().map(|a| a.email.clone()),
                    "subject": m.subject,
                    "date": m.date.map(rfc3339),
                    "received_at": rfc3339(m.received_at),
                    "size": m.size,
                    "attachments": m.attachments,
                    "suppressed": m.suppressed,
                    "truncated": m.truncated,
                    "parse_error": m.parse_error,
                    "text": text,
                })
            })
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    v
}

/// The text head of `cases show`: who, where, when, which language, and
/// a parked timer or participants when there are.
fn case_head(config: &crate::config::Config, case: &Case) -> String {
    let (language, language_source) = crate::mailtext::language_and_source(config, case);
    let mut out = format!(
            "Case #{}: {}\n  customer: {}{}\n  status:   {:?}\n  queue:    {}\n  tier:     {}\n  due:      {}\n  created:  {}\n  language: {} ({})\n",
            case.id,
            printable(&case.subject),
            if case.customer.is_empty() { "(unassigned: sender unreadable)".to_string() } else { printable(&case.customer) },
            case.customer_name.as_ref().map(|n| format!(" ({})", printable(n))).unwrap_or_default(),
            case.status,
            case.queue,
            case.tier,
            case.due_at.map(rfc3339).unwrap_or_else(|| "-".into()),
            rfc3339(case.created_at),
            language,
            language_source,
        );
    if let Some(p) = &case.parked_timer {
        out.push_str(&format!(
            "  timer:    PARKED since {} ({}); `escalator cases retry {}` re-arms it\n",
            rfc3339(p.at),
            printable(&p.error),
            case.id
        ));
    }
    if !case.participants.is_empty() {
        out.push_str(&format!(
            "  participants: {}\n",
            printable(&case.participants.join(", "))
        ));
    }
    out
}

pub(super) fn show_case(shared: &Handle, id: u64, as_json: bool) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let Some(case) = store.case(id)? else {
        return Ok(Response::fail(format!("no case #{id}\n")));
    };
    let history = store.history(id)?;
    let mut messages = Vec::new();
    for seq in store.case_messages(id)? {
        if let Some(m) = store.message(seq)? {
            // The text is read from the stored bytes.
            let raw = if m.truncated { None } else { store.raw(seq)? };
            let text = m.text(raw.as_deref());
            messages.push((m, text));
        }
    }
    let bounces = bounces_of(&history);
    if as_json {
        let v = show_json(&shared.config.get(), &case, bounces, &history, &messages);
        return Ok(Response::ok(json(&v)));
    }
    let mut out = case_head(&shared.config.get(), &case);
    if !bounces.is_empty() {
        out.push_str(&format!("\nBounces ({}):\n", bounces.len()));
        for b in &bounces {
            let field = |k: &str| b[k].as_str().unwrap_or("").to_string();
            out.push_str(&format!(
                "  {}  {} to {}: {} {}\n",
                field("at"),
                field("mail"),
                printable(&field("recipient")),
                field("status"),
                printable(&field("diagnostic"))
            ));
        }
    }
    out.push_str(&format!("\nMessages ({}):\n", messages.len()));
    for (m, text) in &messages {
        out.push_str(&format!(
            "--- {} from {} — {}\n",
            m.received_at.format("%Y-%m-%d %H:%M:%S UTC"),
            printable(
                m.from
                    .as_ref()
                    .map(|a| a.email.as_str())
                    .unwrap_or("(no sender)")
            ),
            printable(&m.subject)
        ));
        for line in text.lines().take(20) {
            out.push_str(&format!("    {}\n", printable(line)));
        }
    }
    out.push_str("\nHistory:\n");
    for e in &history {
        out.push_str(&format!("  {}\n", printable(&event_line(e))));
    }
    Ok(Response::ok(out))
}

pub(super) fn escalate_case(
    shared: &Handle,
    id: u64,
    reason: &str,
) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let before = store.case(id)?.map(|c| c.tier);
    match change_case(shared, id, |c, ctx| {
        policy::escalate_manually(c, reason, ctx)
    })? {
        None => Ok(Response::fail(format!("no case #{id}\n"))),
        Some((c, _)) if Some(&c.tier) == before.as_ref() => Ok(Response::fail(format!(
            "case #{id} is already at the top tier ({}); nothing to escalate\n",
            c.tier
        ))),
        Some((c, n)) => Ok(Response::ok(format!(
            "case #{id} escalated to {} ({n} mail(s) queued)\n",
            c.tier
        ))),
    }
}

pub(super) fn resolve_case(shared: &Handle, id: u64) -> Result<Response, EffectsError> {
    let who = std::env::var("USER").unwrap_or_else(|_| "admin".into());
    match change_case(shared, id, |c, ctx| {
        policy::resolve_case(c, &format!("cli:{who}"), ctx)
    })? {
        None => Ok(Response::fail(format!("no case #{id}\n"))),
        Some((_, n)) => Ok(Response::ok(format!(
            "case #{id} resolved ({n} mail(s) queued)\n"
        ))),
    }
}

pub(super) fn retry_case(shared: &Handle, id: u64) -> Result<Response, EffectsError> {
    let who = std::env::var("USER").unwrap_or_else(|_| "admin".into());
    let mut had = false;
    let changed = change_case(shared, id, |c, ctx| {
        if let Some(p) = c.parked_timer.take() {
            had = true;
            c.timer = Some(crate::case::Timer {
                at: ctx.now.min(p.timer.at),
                kind: p.timer.kind,
            });
            c.push(
                ctx.now,
                crate::case::EventKind::TimerRearmed {
                    by: format!("cli:{who}"),
                },
            );
        }
        Vec::new()
    })?;
    match changed {
        None => Ok(Response::fail(format!("no case #{id}\n"))),
        Some(_) if !had => Ok(Response::fail(format!("case #{id} has no parked timer\n"))),
        Some(_) => Ok(Response::ok(format!(
            "case #{id}: timer re-armed; it fires now\n"
        ))),
    }
}
