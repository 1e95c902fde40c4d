use super::*;

const GOOD: &str = r#"
[mailbox]
host = "127.0.0.1"
port = 1143
security = "plain"
username = "support"
password = "pw"

[smtp]
host = "127.0.0.1"
port = 2525
security = "plain"
from = "Example Support <support@example.test>"

[store]
path = "/tmp/x"

[[tiers]]
name = "Frontline"
first_response = "4h"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/escalator.toml"))
}

fn problems(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("config should be refused"),
        Err(e) => e.to_string(),
    }
}

/// Two queues: support (all tiers) and billing (its own path, its
/// own From and SMTP account).
const QUEUES: &str = r#"
[[mailboxes]]
name = "support"
host = "127.0.0.1"
port = 1143
security = "plain"
username = "support"
password = "pw"

[[mailboxes]]
name = "billing"
address = "Acme Billing <billing@example.test>"
tiers = ["Billing", "Finance"]
host = "127.0.0.1"
port = 1143
security = "plain"
username = "billing-login"
password = "pw"
[mailboxes.smtp]
host = "127.0.0.1"
port = 2526
security = "plain"
username = "billing-login"
password = "pw2"

[smtp]
host = "127.0.0.1"
port = 2525
security = "plain"
from = "Example Support <support@example.test>"

[store]
path = "/tmp/x"

[[tiers]]
name = "Frontline"
first_response = "4h"

[[tiers]]
name = "Finance"
first_response = "8h"
forward_to = ["fin@example.test"]

[[tiers]]
name = "Billing"
first_response = "2h"
forward_to = ["bill@example.test"]
"#;

#[test]
fn smtp_session_settings_are_checked_and_have_defaults() {
    let c = parse(QUEUES).unwrap();
    assert_eq!(c.smtp.max_per_connection, 10, "Exim's default batch");
    assert_eq!(c.smtp.helo_name, None, "None: the host's FQDN");
    let with = |extra: &str| QUEUES.replacen("[smtp]\n", &format!("[smtp]\n{extra}\n"), 1);
    let c = parse(&with(
        "helo_name = \"mx1.example.com\"\nmax_per_connection = 3",
    ))
    .unwrap();
    assert_eq!(c.smtp.helo_name.as_deref(), Some("mx1.example.com"));
    assert_eq!(c.smtp.max_per_connection, 3);
    assert!(parse(&with("helo_name = \"[192.0.2.1]\"")).is_ok());
    assert!(parse(&with("helo_name = \"[IPv6:2001:db8::1]\"")).is_ok());
    assert!(
        parse(&with("helo_name = \"[2001:db8::1]\"")).is_err(),
        "RFC 5321: IPv6: tag"
    );
    // An EHLO line is protocol: no spaces, no line breaks in it.
    let e = problems(&with("helo_name = \"mx.example.com\\r\\nMAIL FROM:<x@y>\""));
    assert!(e.contains("smtp.helo_name"), "{e}");
    let e = problems(&with("helo_name = \"my host\""));
    assert!(e.contains("smtp.helo_name"), "{e}");
    let e = problems(&with("max_per_connection = 0"));
    assert!(e.contains("smtp.max_per_connection"), "{e}");
}

#[test]
fn queues_have_their_own_address_path_and_smtp() {
    let c = parse(QUEUES).unwrap();
    let names: Vec<&str> = c.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["support", "billing"]);
    let (sup, bil) = (&c.queues[0], &c.queues[1]);
    // A queue without an address sends from [smtp] from.
    assert_eq!(sup.address, "support@example.test");
    assert_eq!(sup.path, vec![0, 1, 2], "all tiers in config order");
    assert!(sup.smtp.is_none());
    assert_eq!(bil.address, "billing@example.test");
    assert_eq!(bil.from_name.as_deref(), Some("Acme Billing"));
    assert_eq!(bil.path, vec![2, 1], "Billing, then Finance");
    assert_eq!(
        bil.mailbox.endpoint.username.as_deref(),
        Some("billing-login")
    );
    assert_eq!(bil.smtp.as_ref().map(|e| e.port), Some(2526));
    // Every queue's address is a support address; unknown queue
    // names (cases of a queue since removed) go to the first.
    let support = c.support_addresses();
    assert!(support.contains(&"billing@example.test".to_string()));
    assert!(c.is_queue_address("Billing@Example.test"));
    assert_eq!(c.queue("gone").name, "support");
    let summary = c.summary();
    assert!(
        summary.contains("billing: 127.0.0.1:1143") && summary.contains("Billing → Finance"),
        "{summary}"
    );
    // A lone [mailbox] is the queue `default`, from [smtp] from.
    let one = parse(GOOD).unwrap();
    assert_eq!(one.queues.len(), 1);
    assert_eq!(one.queues[0].name, "default");
    assert_eq!(one.queues[0].address, "support@example.test");
}

#[test]
fn bad_queues_are_refused_naming_the_key() {
    let e = problems(&QUEUES.replace(
        r#"tiers = ["Billing", "Finance"]"#,
        r#"tiers = ["Billing", "Finanse"]"#,
    ));
    assert!(
        e.contains("mailboxes[1].tiers[1]: no tier named \"Finanse\""),
        "{e}"
    );
    let both = format!("{QUEUES}\n[mailbox]\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n");
    let e = problems(&both);
    assert!(
        e.contains("mailboxes: give either one [mailbox] or [[mailboxes]], not both"),
        "{e}"
    );
    let e = problems(&QUEUES.replace(r#"name = "billing""#, r#"name = "support""#));
    assert!(
        e.contains("mailboxes[1].name: queue \"support\" is defined twice"),
        "{e}"
    );
    let e = problems(&QUEUES.replace(r#"name = "billing""#, r#"name = "Billing Team""#));
    assert!(e.contains("mailboxes[1].name"), "{e}");
    let e = problems(&QUEUES.replace(
        "billing-login\"\npassword = \"pw\"\n[mailboxes.smtp]",
        "support\"\npassword = \"pw\"\n[mailboxes.smtp]",
    ));
    assert!(
        e.contains("mailboxes[1]: watches the same folder as queue \"support\""),
        "{e}"
    );
    let e = problems(&QUEUES.replace(
        "Acme Billing <billing@example.test>",
        "support@example.test",
    ));
    assert!(
        e.contains("mailboxes[1].address: support@example.test is already"),
        "{e}"
    );
    let e = problems(&QUEUES.replace("port = 2526", "port = 2526\nfrom = \"x@example.test\""));
    assert!(e.contains("mailboxes[1].smtp.from: not here"), "{e}");
    let e = problems(&GOOD.replace(
        "password = \"pw\"",
        "password = \"pw\"\naddress = \"b@example.test\"",
    ));
    assert!(e.contains("mailbox.address: only in [[mailboxes]]"), "{e}");
    let e = problems(&QUEUES.replace("from = \"Example Support <support@example.test>\"", ""));
    assert!(e.contains("smtp.from: missing"), "{e}");
    // With an address on every queue, [smtp] needs no from: the
    // first queue's is the main one (the digest's sender).
    let own = QUEUES
        .replace("from = \"Example Support <support@example.test>\"", "")
        .replace(
            "\nname = \"support\"\n",
            "\nname = \"support\"\naddress = \"help@example.test\"\n",
        );
    let c = parse(&own).unwrap();
    assert_eq!(c.main_sender().1, "help@example.test");
    assert_eq!(c.support_domain(), "example.test");
    assert_eq!(c.cases.instance, "help@example.test");
    let none = GOOD.replace("[mailbox]", "[unused]");
    assert!(
        problems(&none).contains("unknown field"),
        "typo'd section names are refused"
    );
}

#[test]
fn good_config_parses_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.queues[0].mailbox.folder, "INBOX");
    assert_eq!(c.queues[0].mailbox.poll_interval, Duration::from_secs(60));
    assert!(c.queues[0].mailbox.idle);
    assert_eq!(c.smtp.from, "support@example.test");
    assert_eq!(c.smtp.from_name.as_deref(), Some("Example Support"));
    assert_eq!(c.cases.subject_tag, "Case");
    assert_eq!(
        c.tiers[0].timeline.first_response,
        Duration::from_secs(4 * 3600)
    );
    assert_eq!(c.calendar.timezone, chrono_tz::UTC);
    assert_eq!(c.support_domain(), "example.test");
}

#[test]
fn r17_a_claim_shorter_than_a_send_may_take_is_refused() {
    // Input: `claim = "30s"` with the default 60 s per SMTP step was
    // accepted; a send still running after 30 s was sent again by
    // another node.
    let short = format!("{GOOD}\n[cluster]\nclaim = \"30s\"\n");
    let e = problems(&short);
    assert!(
        e.contains("cluster.claim") && e.contains("longest an SMTP send"),
        "{e}"
    );
    let longest = parse(GOOD).unwrap().longest_send();
    let enough = format!("{GOOD}\n[cluster]\nclaim = \"{}s\"\n", longest.as_secs());
    assert_eq!(parse(&enough).unwrap().cluster.claim, longest);
    // Shorter timeouts and no copies allow a shorter claim.
    let quick = GOOD.replacen(
        "[smtp]\n",
        "[smtp]\ntimeout = \"5s\"\nconfirm_copies = false\n",
        1,
    );
    let quick = format!("{quick}\n[cluster]\nclaim = \"30s\"\n");
    let c = parse(&quick).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        c.longest_send() <= Duration::from_secs(30),
        "{:?}",
        c.longest_send()
    );
}

#[test]
fn cluster_keys_have_defaults_and_bad_ones_are_named() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.cluster.lease, Duration::from_secs(15));
    // Unset, the claim outlasts the longest send (here: steps of 60 s
    // and the 5 minutes' wait for a confirmation copy).
    assert_eq!(c.cluster.claim, c.longest_send() + CLAIM_MARGIN);
    assert!(c.cluster.claim >= DEFAULT_CLAIM);
    assert_eq!(c.cluster.node, None);
    let pg = GOOD.replacen(
        "[store]\n",
        "[store]\nengine = \"postgres\"\nurl_env = \"PGURL\"\n",
        1,
    );
    match &parse(&pg).unwrap().store.engine {
        StoreEngine::Postgres { pool, .. } => assert_eq!(*pool, DEFAULT_POOL),
        other => panic!("{other:?}"),
    }
    for (tail, key) in [
        ("[cluster]\nlease = \"1s\"\n", "cluster.lease"),
        ("[cluster]\nlease = \"soon\"\n", "cluster.lease"),
        ("[cluster]\nclaim = \"5s\"\n", "cluster.claim"),
        // A name is shown in tables and logs: no spaces, no controls.
        ("[cluster]\nnode = \"a b\\n\"\n", "cluster.node"),
        ("[cluster]\nnode = \"\"\n", "cluster.node"),
        ("[cluster]\nnodes = \"x\"\n", "cluster.nodes"),
    ] {
        let e = problems(&format!("{pg}{tail}"));
        assert!(e.contains(key), "{tail}: {e}");
    }
    let e = problems(&pg.replace("url_env = \"PGURL\"\n", "url_env = \"PGURL\"\npool = 1\n"));
    assert!(e.contains("store.pool"), "{e}");
    let e = problems(&GOOD.replacen("[store]\n", "[store]\npool = 4\n", 1));
    assert!(e.contains("store.pool: only with engine"), "{e}");
    // The schema is put into statements: a plain name, not one shared.
    for bad in ["public", "Escalator", "a-b", "x;drop", "pg_x", "1a", ""] {
        let with = pg.replace(
            "url_env = \"PGURL\"\n",
            &format!("url_env = \"PGURL\"\nschema = \"{bad}\"\n"),
        );
        let e = problems(&with);
        assert!(e.contains("store.schema"), "{bad}: {e}");
    }
    let ok = parse(&pg.replace(
        "url_env = \"PGURL\"\n",
        "url_env = \"PGURL\"\nschema = \"support_eu\"\n",
    ))
    .unwrap();
    match &ok.store.engine {
        StoreEngine::Postgres { schema, .. } => assert_eq!(schema, "support_eu"),
        StoreEngine::Sled => panic!("postgres"),
    }
    let e = problems(&GOOD.replacen("[store]\n", "[store]\nschema = \"x\"\n", 1));
    assert!(e.contains("store.schema: only with engine"), "{e}");
    let named = parse(&format!("{GOOD}[cluster]\nnode = \"eu-1\"\n")).unwrap();
    assert_eq!(named.cluster.node.as_deref(), Some("eu-1"));
}

#[test]
fn plain_postgresql_checks_every_host_and_hostaddr() {
    // Issue 17 (B): only `host` was checked, so `host=localhost
    // hostaddr=192.0.2.2` sent the password in clear off the machine.
    let remote = |url: &str| match url.parse::<postgres::Config>() {
        Ok(c) => postgres_remote_addresses(&c),
        Err(e) => panic!("{url}: {e}"),
    };
    let none: [&str; 0] = [];
    for (url, want) in [
        (
            "host=localhost hostaddr=192.0.2.2 dbname=e",
            vec!["192.0.2.2"],
        ),
        (
            "host=127.0.0.1,db.example.com dbname=e",
            vec!["db.example.com"],
        ),
        (
            "host=localhost,localhost hostaddr=127.0.0.1,192.0.2.3",
            vec!["192.0.2.3"],
        ),
        (
            "postgresql://localhost/e?hostaddr=192.0.2.2",
            vec!["192.0.2.2"],
        ),
        ("postgresql://u:pw@localhost:5432,db2:5433/e", vec!["db2"]),
        ("postgres://u@db.example.com/e", vec!["db.example.com"]),
    ] {
        assert_eq!(remote(url), want, "{url}");
    }
    for url in [
        "host=/var/run/postgresql dbname=e",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/e",
        "host=localhost hostaddr=127.0.0.1 password=pw",
        "host=::1 dbname=e",
        "postgresql://[::1]:5432,127.0.0.2/e",
        "postgresql://u:pw@localhost/e",
    ] {
        assert_eq!(remote(url), none, "{url}");
    }
}

#[test]
fn plain_postgresql_to_a_remote_hostaddr_is_refused_before_connecting() {
    let pg = GOOD.replacen(
        "[store]\n",
        "[store]\nengine = \"postgres\"\nsecurity = \"plain\"\n\
         url = \"host=localhost hostaddr=192.0.2.2 dbname=e password=hunter2\"\n",
        1,
    );
    let c = parse(&pg).unwrap();
    let e = match crate::app::open_store(&c, Duration::ZERO) {
        Ok(_) => panic!("a remote hostaddr in clear was accepted"),
        Err(e) => format!("{e:#}"),
    };
    for want in ["store.security", "store.allow_insecure", "192.0.2.2"] {
        assert!(e.contains(want), "{e}");
    }
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn unknown_key_is_named_with_its_path_and_line() {
    let text = GOOD.replace("password = \"pw\"", "password = \"pw\"\npasword = \"x\"");
    let e = problems(&text);
    assert!(e.contains("mailbox.pasword"), "{e}");
    assert!(e.contains("line 8"), "{e}");
}

#[test]
fn dkim_without_authserv_id_is_refused() {
    // Input: require_dkim_pass without naming the receiving server,
    // which would trust Authentication-Results any sender can write.
    let e = problems(&format!("{GOOD}[cases]\nrequire_dkim_pass = true\n"));
    assert!(e.contains("cases.authserv_id"), "{e}");
    let with = format!(
        "{}\n[cases]\nrequire_dkim_pass = true\nauthserv_id = \"MX.example.test\"\n",
        GOOD
    );
    // `[cases]` after `[[tiers]]` is still its own table in TOML.
    let c = parse(&with).unwrap();
    assert_eq!(c.cases.authserv_id.as_deref(), Some("mx.example.test"));
    let e = problems(&with.replace("MX.example.test", "mx; dkim=pass"));
    assert!(e.contains("cases.authserv_id"), "{e}");
}

#[test]
fn a_huge_duration_is_a_clear_config_error() {
    // Input: `renotify = "1000000d"`: deadlines computed from it
    // overflowed and killed the scheduler.
    let e = problems(&format!("{GOOD}renotify = \"1000000d\"\n"));
    assert!(e.contains("tiers[0].renotify"), "{e}");
    assert!(e.contains("too long"), "{e}");
    assert!(parse_duration("3650d").is_ok());
}

#[test]
fn unknown_key_in_tier_is_named() {
    let e = problems(&format!("{GOOD}frist_response = \"1h\"\n"));
    assert!(e.contains("tiers[0].frist_response"), "{e}");
}

#[test]
fn bad_duration_is_named() {
    let e = problems(&GOOD.replace("\"4h\"", "\"4 hourz\""));
    assert!(e.contains("tiers[0].first_response"), "{e}");
}

#[test]
fn plain_to_remote_host_is_refused_unless_allowed() {
    let text = GOOD.replacen("host = \"127.0.0.1\"", "host = \"imap.example.com\"", 1);
    let e = problems(&text);
    assert!(e.contains("mailbox.security"), "{e}");
    assert!(e.contains("allow_insecure"), "{e}");
    let text = text.replacen(
        "security = \"plain\"",
        "security = \"plain\"\nallow_insecure = true",
        1,
    );
    assert!(parse(&text).is_ok());
}

#[test]
fn password_from_env_and_missing_env_named() {
    std::env::set_var("ESCALATOR_CONFIG_TEST_PW", "from-env");
    let c = parse(&GOOD.replace(
        "password = \"pw\"",
        "password_env = \"ESCALATOR_CONFIG_TEST_PW\"",
    ))
    .unwrap();
    assert_eq!(
        c.queues[0]
            .mailbox
            .endpoint
            .password()
            .unwrap()
            .unwrap()
            .expose(),
        "from-env"
    );
    assert!(c.secret_problems().is_empty());
    let c = parse(&GOOD.replace("password = \"pw\"", "password_env = \"NOPE_UNSET\"")).unwrap();
    let e = c.secret_problems().join("\n");
    assert!(
        e.contains("mailbox.password_env") && e.contains("NOPE_UNSET"),
        "{e}"
    );
}

#[test]
fn store_only_use_needs_no_mail_secret() {
    // Input: `stats`/`cases list` on a config whose password variable
    // is not set (an admin or cron job that only reads the store).
    // Loading succeeds; only a connection needs the secret.
    let c = parse(&GOOD.replace("password = \"pw\"", "password_env = \"UNSET_FOR_STATS\""));
    let c = c.expect("a config with an unset password variable loads");
    assert_eq!(c.secret_problems().len(), 1);
    assert!(c.queues[0].mailbox.endpoint.password().is_err());
}

#[test]
fn password_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    std::fs::write(&f, "s3cret\n").unwrap();
    let text = GOOD.replace(
        "password = \"pw\"",
        &format!("password_file = {:?}", f.display().to_string()),
    );
    let c = parse(&text).unwrap();
    assert_eq!(
        c.queues[0]
            .mailbox
            .endpoint
            .password()
            .unwrap()
            .unwrap()
            .expose(),
        "s3cret"
    );
}

#[test]
fn secrets_never_print() {
    let c = parse(GOOD).unwrap();
    assert!(!format!("{c:?}").contains("\"pw\""));
    assert!(!c.summary().contains("pw\n"));
    assert!(c.summary().contains("password set"));
}

#[test]
fn several_problems_are_all_reported() {
    let text = GOOD
        .replace("\"4h\"", "\"soon\"")
        .replace("Example Support <support@example.test>", "nobody");
    let e = problems(&(text + "[calendar]\ntimezone = \"Mars/Olympus\"\n"));
    assert!(e.contains("tiers[0].first_response"), "{e}");
    assert!(e.contains("smtp.from"), "{e}");
    assert!(e.contains("calendar.timezone"), "{e}");
}

#[test]
fn no_tiers_is_refused() {
    let text = "tiers = []\n".to_string() + GOOD.split("[[tiers]]").next().unwrap();
    let e = problems(&text);
    assert!(e.contains("tiers: at least one"), "{e}");
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
    assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
    assert!(parse_duration("").is_err());
    assert_eq!(parse_size("25MB").unwrap(), 25 << 20);
    assert_eq!(parse_size("100").unwrap(), 100);
    assert!(parse_size("lots").is_err());
}

#[test]
fn mailbox_parsing() {
    assert_eq!(
        parse_mailbox("\"A B\" <A@X.org>"),
        Some((Some("A B".into()), "a@x.org".into()))
    );
    assert_eq!(parse_mailbox("a@x.org"), Some((None, "a@x.org".into())));
    assert_eq!(parse_mailbox("nobody"), None);
    assert_eq!(parse_mailbox("a b@x.org"), None);
}

#[test]
fn shipped_example_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in ["escalator.toml", "demo.toml"] {
        let path = root.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let r = Config::parse(&text, &path);
        assert!(r.is_ok(), "{name}: {}", r.err().unwrap());
    }
}

#[tokio::test]
async fn oauth_token_command_stderr_is_not_in_the_error() {
    // Input: a token command that fails and prints details of the
    // admin's tooling on stderr; that text went into the outbox's
    // `last_error` (shown by `outbox list`, kept in the store).
    let e = TokenSource::Command("echo 'vault token s.XYZ expired' >&2; exit 3".into())
        .token()
        .await
        .unwrap_err();
    assert!(e.contains("failed") && !e.contains("s.XYZ"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_oauth_token_command_times_out() {
    // Input: a token command that never returns; it ran synchronously
    // on the runtime with no timeout.
    let e = TokenSource::Command("sleep 100000".into())
        .token()
        .await
        .unwrap_err();
    assert!(e.contains("did not finish"), "{e}");
}

#[tokio::test]
async fn xoauth2_needs_a_token_source_and_reads_a_fresh_token_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, "ya29.first\n").unwrap();
    let text = GOOD.replace(
        "password = \"pw\"",
        &format!(
            "auth = \"xoauth2\"\noauth_token_file = \"{}\"",
            tok.display()
        ),
    );
    let c = parse(&text).unwrap();
    let source = c.queues[0].mailbox.endpoint.oauth.clone().unwrap();
    assert_eq!(source.token().await.unwrap().expose(), "ya29.first");
    std::fs::write(&tok, "ya29.second").unwrap();
    assert_eq!(source.token().await.unwrap().expose(), "ya29.second");
    assert_eq!(
        TokenSource::xoauth2("support@x.org", &Secret::new("t0k")),
        "user=support@x.org\x01auth=Bearer t0k\x01\x01"
    );
    let cmd = TokenSource::Command("printf 'from-cmd\\n'".into());
    assert_eq!(cmd.token().await.unwrap().expose(), "from-cmd");
    assert!(TokenSource::Command("exit 3".into())
        .token()
        .await
        .unwrap_err()
        .contains("failed"));

    let e = problems(&GOOD.replace("password = \"pw\"", "auth = \"xoauth2\""));
    assert!(
        e.contains("mailbox.auth: xoauth2 needs oauth_token_file"),
        "{e}"
    );
    let e = problems(&GOOD.replace("password = \"pw\"", "auth = \"oauth\""));
    assert!(e.contains("mailbox.auth: unknown \"oauth\""), "{e}");
    let e = problems(&text.replace("[smtp]", "oauth_token_command = \"x\"\n[smtp]"));
    assert!(
        e.contains("give only one of oauth_token_file, oauth_token_command"),
        "{e}"
    );
}

mod oauth;
