//! The text every test config starts with, shared by the unit tests
//! ([`crate::testing`]) and the fuzz entry ([`crate::fuzzing`]), which is
//! built without the test fixtures.

use std::path::Path;

/// `[mailbox]` and `[smtp]` on loopback without TLS (`mailbox` is
/// appended to `[mailbox]`), the store at `store`, then `rest` (the
/// tiers at least).
pub fn config_text(store: &Path, mailbox: &str, rest: &str) -> String {
    format!(
        r#"
[mailbox]
host = "127.0.0.1"
security = "plain"
username = "s"
password = "p"
{mailbox}
[smtp]
host = "127.0.0.1"
security = "plain"
from = "Support <support@example.test>"
[store]
path = "{}"
{rest}
"#,
        store.display()
    )
}
