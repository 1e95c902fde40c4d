//! Admin reports: KPIs (`stats`), the review digest, the cluster status.

use super::*;

pub(super) fn stats(
    shared: &Handle,
    since_secs: Option<u64>,
    as_json: bool,
) -> Result<Response, EffectsError> {
    let now = shared.clock.now();
    let report = stats_report(shared, since_secs, now)?;
    Ok(Response::ok(if as_json {
        json(&report) + "\n"
    } else {
        report.text()
    }))
}

pub(super) fn digest(shared: &Handle) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let config = shared.config.get();
    let d = config
        .digest
        .clone()
        .unwrap_or(crate::config::DigestConfig {
            to: Vec::new(),
            every: std::time::Duration::from_secs(7 * 86_400),
        });
    let now = shared.clock.now();
    let start = now - chrono::Duration::from_std(d.every).unwrap_or_default();
    let text = crate::digest::mail(store, &config, &d, start, now, now)?;
    Ok(Response::ok(text.body))
}

pub(super) fn cluster_status(shared: &Handle, as_json: bool) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    let now = shared.clock.now();
    let status = crate::cluster::status(store, &shared.config.get(), now)?;
    Ok(Response::ok(if as_json {
        json(&status) + "\n"
    } else {
        status.text(now)
    }))
}
