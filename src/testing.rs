//! Test fixtures shared by the unit tests of several modules: one small
//! config, and a private PostgreSQL server.

use std::path::Path;

use crate::config::Config;

/// A config on loopback with a store in `dir`: `[cases]` gets `cases`
/// appended, and `tiers` follows the first tier ("Frontline", staff
/// `agent@example.test`) for tests that need more.
pub fn config(dir: &Path, cases: &str, tiers: &str) -> Config {
    let rest = format!(
        r#"
[cases]
{cases}
[[tiers]]
name = "Frontline"
first_response = "4h"
staff = ["agent@example.test"]
{tiers}
"#
    );
    config_from(&dir.join("store"), "", &rest)
}

/// Every test config: `[mailbox]` and `[smtp]` on loopback without TLS
/// (`mailbox` is appended to `[mailbox]`), the store at `store`, then
/// `rest` (the tiers at least).
pub fn config_from(store: &Path, mailbox: &str, rest: &str) -> Config {
    let text = crate::fixture::config_text(store, mailbox, rest);
    match Config::parse(&text, Path::new("/x.toml")) {
        Ok(c) => c,
        Err(e) => panic!("test config: {e}"),
    }
}

/// A private PostgreSQL server (shared with the integration tests).
/// An OAuth 2 authorization server (shared with the integration tests).
#[path = "testing/authserver.rs"]
pub mod authserver;

#[path = "testing/postgres.rs"]
mod postgres_server;
pub use postgres_server::Postgres;
