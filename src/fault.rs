//! Fault injection for the crash tests: `ESCALATOR_FAULT=<point>` makes
//! the process abort at that point, as a power cut or `kill -9` would.
//! Unset (always, in production), every check is one cached comparison.

use std::sync::OnceLock;

/// Points where a test can make the daemon die.
pub const AFTER_SMTP_ACCEPT: &str = "abort-after-smtp-accept";

/// Aborts the process if the test asked for a fault at `point`.
pub fn point(point: &str) {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    let f = FAULT.get_or_init(|| std::env::var("ESCALATOR_FAULT").ok());
    if f.as_deref() == Some(point) {
        eprintln!("escalator: injected fault at {point}: aborting");
        std::process::abort();
    }
}
