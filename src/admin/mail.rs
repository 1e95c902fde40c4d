//! Admin requests about mail: the outbox (list, show decoded, retry) and
//! the quarantine (list, retry).

use super::*;

pub(super) fn list_quarantine(shared: &Handle, as_json: bool) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let entries: Vec<_> = store.quarantined().collect::<Result<_, _>>()?;
    if as_json {
        return Ok(Response::ok(json(&entries)));
    }
    let mut out = String::new();
    for q in &entries {
        out.push_str(&format!(
            "{:>5}  {} uid {}  {}  {}\n",
            q.id,
            printable(&q.folder),
            q.uid,
            q.at.to_rfc3339(),
            printable(&q.error)
        ));
    }
    out.push_str(&format!("{} message(s) in quarantine\n", entries.len()));
    Ok(Response::ok(out))
}

pub(super) fn retry_quarantine(shared: &Handle, id: Option<u64>) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let ids: Vec<u64> = match id {
        Some(id) => vec![id],
        None => store
            .quarantined()
            .map(|q| q.map(|q| q.id))
            .collect::<Result<_, _>>()?,
    };
    let mut out = String::new();
    let mut code = 0;
    for id in ids {
        match Ingestor::new(shared.clone()).retry_quarantined(id)? {
            None => {
                out.push_str(&format!("{id}: no such quarantined message\n"));
                code = 1;
            }
            Some(Outcome::Quarantined { id: again }) => {
                out.push_str(&format!(
                    "{id}: failed again (now quarantine entry {again})\n"
                ));
                code = 1;
            }
            Some(Outcome::Stored { case, .. }) => {
                out.push_str(&format!("{id}: stored in case #{case}\n"))
            }
            Some(Outcome::Bounce { case: Some(case) }) => out.push_str(&format!(
                "{id}: a delivery report, recorded on case #{case}\n"
            )),
            Some(Outcome::Bounce { case: None }) => out.push_str(&format!(
                "{id}: a delivery report about no mail escalator sent; not stored\n"
            )),
            Some(Outcome::Refetch { folder, uid }) => out.push_str(&format!(
                "{id}: the server would not give it; uid {uid} of {} is fetched again \
                     on the watcher's next pass\n",
                printable(&folder)
            )),
            Some(_) => out.push_str(&format!("{id}: already stored\n")),
        }
    }
    Ok(Response { code, output: out })
}

pub(super) fn list_outbox(
    shared: &Handle,
    as_json: bool,
    all: bool,
) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let entries: Vec<_> = store
        .outbox()
        .filter(|e| {
            all || e
                .as_ref()
                .map(|e| e.state != OutboxState::Sent)
                .unwrap_or(true)
        })
        .collect::<Result<_, _>>()?;
    if as_json {
        // The placeholders' nonce stays inside the store.
        let v: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.remove("attach_nonce");
                }
                v
            })
            .collect();
        return Ok(Response::ok(json(&v)));
    }
    let mut out = String::new();
    for e in &entries {
        out.push_str(&format!(
            "{:>6}  case #{:<6} {:<8} {:<8} attempts {}  to {}  {}\n",
            e.id,
            e.case,
            e.kind,
            format!("{:?}", e.state).to_lowercase(),
            e.attempts,
            printable(&e.to.join(", ")),
            printable(e.last_error.as_deref().unwrap_or(""))
        ));
    }
    out.push_str(&format!(
        "{} entr{}\n",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" }
    ));
    Ok(Response::ok(out))
}

pub(super) fn show_outbox(shared: &Handle, id: u64) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let Some(entry) = store.outbox_entry(id)? else {
        return Ok(Response::fail(format!("no outbox entry {id}\n")));
    };
    match store.outbox_raw(id)? {
        Some(raw) => {
            let raw = outbox::expand(store, &entry, raw)?;
            Ok(Response::ok(readable_mail(&entry, &raw)))
        }
        None => Ok(Response::fail(format!(
            "outbox entry {id}: its text is no longer kept (sent mail is pruned \
                 after [store] keep_sent)\n"
        ))),
    }
}

pub(super) fn retry_outbox(shared: &Handle, id: u64) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    match outbox::retry(store, id, shared.clock.now())? {
        None => Ok(Response::fail(format!("no outbox entry {id}\n"))),
        Some(e) if e.state == OutboxState::Pending => Ok(Response::ok(format!(
            "outbox entry {id} queued for sending again\n"
        ))),
        Some(e) => Ok(Response::fail(format!(
            "outbox entry {id} is {:?}, not failed; nothing to retry\n",
            e.state
        ))),
    }
}
