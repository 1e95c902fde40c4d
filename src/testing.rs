//! Test fixtures shared by the unit tests of several modules: one small
//! config, and a panic point a test can aim at one piece of work.

use std::path::Path;
use std::sync::Mutex;

use crate::config::Config;

/// A config on loopback with a store in `dir`: `[cases]` gets `cases`
/// appended, and `tiers` follows the first tier ("Frontline", staff
/// `agent@example.test`) for tests that need more.
pub fn config(dir: &Path, cases: &str, tiers: &str) -> Config {
    let text = format!(
        r#"
[mailbox]
host = "127.0.0.1"
security = "plain"
username = "s"
password = "p"
[smtp]
host = "127.0.0.1"
security = "plain"
from = "Support <support@example.test>"
[store]
path = "{}"
[cases]
{cases}
[[tiers]]
name = "Frontline"
first_response = "4h"
staff = ["agent@example.test"]
{tiers}
"#,
        dir.join("store").display()
    );
    match Config::parse(&text, Path::new("/x.toml")) {
        Ok(c) => c,
        Err(e) => panic!("test config: {e}"),
    }
}

/// Makes the work on one id panic once (a timer's case, an outbox entry).
#[derive(Default)]
pub struct PanicPoint(Mutex<Option<u64>>);

impl PanicPoint {
    /// For a `static` (where `Default` cannot be called).
    pub const fn new() -> PanicPoint {
        PanicPoint(Mutex::new(None))
    }

    /// The next work on `id` panics.
    pub fn aim(&self, id: u64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// Called where the work begins; panics if aimed at `id`.
    pub fn reach(&self, id: u64, what: &str) {
        let hit = {
            let mut p = self.0.lock().unwrap_or_else(|p| p.into_inner());
            (*p == Some(id)).then(|| p.take())
        };
        if hit.is_some() {
            panic!("test-induced failure {what} {id}");
        }
    }
}

/// A private PostgreSQL server (shared with the integration tests).
#[path = "testing/postgres.rs"]
mod postgres_server;
pub use postgres_server::Postgres;
