//! Reading ahead on PostgreSQL: a chunk is threaded exactly as on sled,
//! in a few round trips instead of several a message.

use super::tests::{setup, setup_over, src};
use super::*;
use crate::store::{PgTls, Store};

/// A customer's new message, `n` naming both customer and Message-ID.
fn new_mail(n: u32) -> Vec<u8> {
    format!(
        "From: Customer {n} <c{n}@example.org>\r\nSubject: topic {n}\r\n\
         Message-ID: <m{n}@x>\r\n\r\nbody {n}\r\n"
    )
    .into_bytes()
}

/// Customer `n`'s reply to `cited` (In-Reply-To), with `references`.
fn reply(n: u32, id: &str, cited: &str, references: &str) -> Vec<u8> {
    format!(
        "From: c{n}@example.org\r\nSubject: Re: topic {n}\r\nMessage-ID: <{id}>\r\n\
         In-Reply-To: <{cited}>\r\nReferences: {references}\r\n\r\nmore\r\n"
    )
    .into_bytes()
}

/// Two chunks that exercise every lookup read ahead, and one it does
/// not guess (the match lies past the cited IDs read ahead).
fn chunks() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut first: Vec<Vec<u8>> = (0..5).map(new_mail).collect();
    // A reply that arrives before the message it answers.
    first.push(reply(5, "early@x", "late@x", "<late@x>"));
    let mut second = Vec::new();
    for n in 0..5 {
        second.push(reply(n, &format!("r{n}@x"), &format!("m{n}@x"), ""));
    }
    // The message answered above: joins the case of its reply.
    second.push(
        b"From: c5@example.org\r\nSubject: topic 5\r\nMessage-ID: <late@x>\r\n\r\nfirst\r\n"
            .to_vec(),
    );
    // The same message again.
    second.push(new_mail(1));
    // Twenty unknown references after the one that threads it.
    let noise: String = (0..20).map(|i| format!(" <noise{i}@y>")).collect();
    second.push(reply(2, "deep@x", "unknown@y", &format!("<m2@x>{noise}")));
    second.extend((10..30).map(new_mail));
    (first, second)
}

fn ingest(ing: &Ingestor, raws: &[Vec<u8>], first_uid: u32) -> Vec<Outcome> {
    let items: Vec<(Source, Item<'_>)> = raws
        .iter()
        .zip(first_uid..)
        .map(|(raw, uid)| {
            let item = Item::Bytes {
                raw,
                truncated: None,
            };
            (src(1, uid), item)
        })
        .collect();
    ing.ingest_batch(&items).unwrap()
}

#[test]
fn a_chunk_on_postgresql_is_threaded_as_on_sled_with_its_lookups_read_ahead() {
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (on_sled, _) = setup(&dir.path().join("sled"));
    let config = crate::testing::config(
        &dir.path().join("pg"),
        "auto_reply_limit = 2\nauto_reply_window = \"1h\"\n",
        "",
    );
    let store = Store::open_postgres(
        &pg.database("ahead"),
        PgTls::Plain,
        2,
        &dir.path().join("pg/node"),
    )
    .unwrap();
    let (on_pg, _) = setup_over(config, store);
    let (first, second) = chunks();
    let n = first.len() as u32;
    let sled_out = [
        ingest(&on_sled, &first, 1),
        ingest(&on_sled, &second, n + 1),
    ];
    let pg_first = ingest(&on_pg, &first, 1);
    let before = on_pg.store.reads_made();
    let pg_second = ingest(&on_pg, &second, n + 1);
    let reads = on_pg.store.reads_made() - before;
    assert_eq!(sled_out, [pg_first, pg_second.clone()]);
    // What the chunk must come to, so the comparison is not of two
    // equally wrong answers.
    let case_of = |o: &Outcome| match o {
        Outcome::Stored { case, new, .. } => (*case, *new),
        o => panic!("{o:?}"),
    };
    for (i, o) in pg_second[..5].iter().enumerate() {
        assert_eq!(case_of(o), (i as u64 + 1, false), "reply {i}");
    }
    assert_eq!(
        case_of(&pg_second[5]),
        (6, false),
        "the original joins its early reply"
    );
    assert_eq!(pg_second[6], Outcome::Duplicate);
    assert_eq!(
        case_of(&pg_second[7]),
        (3, false),
        "threaded past the IDs read ahead"
    );
    assert!(pg_second[8..].iter().all(|o| case_of(o).1));
    // Before reading ahead, each message took about nine reads (its
    // Message-ID, the cases citing it, the cases of what it cites and
    // their rows, its sender's cases, language and recent auto-replies,
    // three sequence numbers, a new case's rows): 250 for this chunk.
    // Now the chunk takes a dozen, whatever its size (cursor, sequence
    // blocks, one read per index ahead), plus the 13 cited IDs past
    // those read ahead, read as threading tries them.
    assert!(
        reads <= 12 + 13,
        "{reads} reads for {} messages",
        second.len()
    );
}
