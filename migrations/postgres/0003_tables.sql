-- escalator's store on PostgreSQL, version 3: a table of its own for each
-- of the store's key spaces, in the schema `[store] schema` names (written
-- here as {schema}; the name is checked to be a plain identifier before it
-- is put in). Replaces version 1's single `escalator_kv` table, which a
-- node converts in place when it starts (src/store/postgres/upgrade.rs).
--
-- Every table has `key` and `value`, the engine's own (its keys and the
-- record in the store's binary encoding, as the embedded engine keeps
-- them: the daemon reads these); the other columns are the record's
-- fields for people, written by the daemon with each row. Those columns
-- are the contract (docs/postgresql.md, "Tables"); `key` and `value` are
-- not. Times are timestamptz, counts bigint, names and
-- addresses text.

CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE {schema}.meta (
    key   bytea PRIMARY KEY,
    value bytea NOT NULL,
    name  text
);

CREATE TABLE {schema}.cases (
    key               bytea PRIMARY KEY,
    value             bytea NOT NULL,
    id                bigint NOT NULL UNIQUE,
    queue             text NOT NULL,
    customer          text NOT NULL,
    customer_name     text,
    subject           text NOT NULL,
    status            text NOT NULL,
    tier              text NOT NULL,
    priority          text,
    opened_at         timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    deadline          timestamptz,
    next_timer_at     timestamptz,
    timer_kind        text,
    first_response_at timestamptz,
    answered_at       timestamptz,
    resolved_at       timestamptz,
    escalations       bigint NOT NULL,
    breached          boolean NOT NULL,
    repeat_customer   boolean NOT NULL,
    csat              smallint,
    message_count     bigint NOT NULL,
    previous_case     bigint,
    language          text
);
CREATE INDEX cases_queue_status_tier ON {schema}.cases (queue, status, tier);
CREATE INDEX cases_opened_at ON {schema}.cases (opened_at);
CREATE INDEX cases_customer ON {schema}.cases (customer);
-- Open cases by tier (`/metrics`, every scrape) read only these.
CREATE INDEX cases_open_tier ON {schema}.cases (tier) WHERE status <> 'resolved';

CREATE TABLE {schema}.messages (
    key          bytea PRIMARY KEY,
    value        bytea NOT NULL,
    seq          bigint NOT NULL UNIQUE,
    case_id      bigint NOT NULL,
    message_id   text NOT NULL,
    from_address text,
    from_name    text,
    subject      text NOT NULL,
    date         timestamptz,
    received_at  timestamptz NOT NULL,
    folder       text NOT NULL,
    uid          bigint NOT NULL,
    size         bigint NOT NULL,
    truncated    boolean NOT NULL,
    suppressed   text
);
CREATE INDEX messages_case ON {schema}.messages (case_id);

-- Raw mail: a stored message's bytes (message_seq) or an outgoing mail's
-- (outbox_id), in `value`.
CREATE TABLE {schema}.raw (
    key         bytea PRIMARY KEY,
    value       bytea NOT NULL,
    message_seq bigint,
    outbox_id   bigint,
    size        bigint NOT NULL
);

-- One row per Message-ID and content: the primary key is the unique
-- index that stores a message once.
CREATE TABLE {schema}.message_ids (
    key          bytea PRIMARY KEY,
    value        bytea NOT NULL,
    message_id   text,
    content_hash text,
    case_id      bigint,
    message_seq  bigint
);

CREATE TABLE {schema}.cursors (
    key          bytea PRIMARY KEY,
    value        bytea NOT NULL,
    queue        text NOT NULL,
    folder       text NOT NULL,
    uid_validity bigint,
    last_uid     bigint
);

CREATE TABLE {schema}.outbox (
    key             bytea PRIMARY KEY,
    value           bytea NOT NULL,
    id              bigint NOT NULL UNIQUE,
    case_id         bigint NOT NULL,
    kind            text NOT NULL,
    message_id      text NOT NULL,
    from_address    text NOT NULL,
    recipients      text NOT NULL,
    subject         text NOT NULL,
    state           text NOT NULL,
    attempts        bigint NOT NULL,
    created_at      timestamptz NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    attempt_at      timestamptz,
    sent_at         timestamptz,
    last_error      text
);
CREATE INDEX outbox_case ON {schema}.outbox (case_id);

-- An entry (part 'entry') and the message's bytes (part 'raw', in value).
CREATE TABLE {schema}.quarantine (
    key          bytea PRIMARY KEY,
    value        bytea NOT NULL,
    id           bigint NOT NULL,
    part         text NOT NULL,
    queue        text,
    folder       text,
    uid_validity bigint,
    uid          bigint,
    error        text,
    at           timestamptz,
    attempts     bigint
);

CREATE TABLE {schema}.customers (
    key      bytea PRIMARY KEY,
    value    bytea NOT NULL,
    customer text,
    case_id  bigint
);

CREATE TABLE {schema}.auto_replies (
    key       bytea PRIMARY KEY,
    value     bytea NOT NULL,
    recipient text,
    sent_at   timestamptz,
    outbox_id bigint
);

CREATE TABLE {schema}.deadlines (
    key     bytea PRIMARY KEY,
    value   bytea NOT NULL,
    at      timestamptz,
    case_id bigint
);

CREATE TABLE {schema}.outbox_pending (
    key       bytea PRIMARY KEY,
    value     bytea NOT NULL,
    outbox_id bigint
);

-- The KPI facts in packed buckets and the index of unresolved cases: the
-- daemon's own (read the view case_facts instead).
CREATE TABLE {schema}.facts (
    key   bytea PRIMARY KEY,
    value bytea NOT NULL
);

CREATE TABLE {schema}.message_cases (
    key        bytea PRIMARY KEY,
    value      bytea NOT NULL,
    message_id text,
    case_id    bigint
);

-- A case's history, one row per write of the case: `value` is a JSON list
-- of the events it added, the first being event number first_event.
-- The view case_events has one row per event.
CREATE TABLE {schema}.history (
    key         bytea PRIMARY KEY,
    value       bytea NOT NULL,
    case_id     bigint NOT NULL,
    first_event bigint NOT NULL
);
CREATE INDEX history_case ON {schema}.history (case_id);

CREATE TABLE {schema}.case_messages (
    key         bytea PRIMARY KEY,
    value       bytea NOT NULL,
    case_id     bigint NOT NULL,
    position    bigint NOT NULL,
    message_seq bigint
);

CREATE TABLE {schema}.referrers (
    key        bytea PRIMARY KEY,
    value      bytea NOT NULL,
    message_id text,
    case_id    bigint
);

-- The store's numbers (cases, messages, outgoing mail, quarantine), never
-- handed out twice; a transaction that does not commit leaves a gap. Each
-- node takes case numbers 64 at a time (64k+1 to 64k+64), so all but one
-- of a block's cases fall in a KPI bucket (facts, cases 64k to 64k+63) no
-- other node writes, and the nodes' commits do not wait for one another.
CREATE SEQUENCE {schema}.next_case CACHE 64;
CREATE SEQUENCE {schema}.next_message;
CREATE SEQUENCE {schema}.next_outbox;
CREATE SEQUENCE {schema}.next_quarantine;

-- The cluster: every running daemon, and who watches which mailbox until
-- when (times from the database's clock). `token` is the fencing token:
-- it grows with every new holder, and every write that depends on the
-- mailbox checks it in its own transaction.
CREATE TABLE {schema}.nodes (
    node       text        PRIMARY KEY,
    host       text        NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL
);
CREATE SEQUENCE {schema}.lease_tokens;
CREATE TABLE {schema}.leases (
    mailbox     text        PRIMARY KEY,
    holder      text        NOT NULL,
    token       bigint      NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- One row per event of a case's history.
CREATE VIEW {schema}.case_events AS
SELECT h.case_id,
       h.first_event + e.n - 1            AS position,
       (e.event ->> 'at')::timestamptz    AS at,
       e.event ->> 'kind'                 AS kind,
       e.event ->> 'reason'               AS reason,
       e.event                            AS detail
FROM {schema}.history h,
     -- jsonb takes no NUL, which a sender may put in a name or a subject.
     jsonb_array_elements(replace(convert_from(h.value, 'UTF8'), '\u0000', '\ufffd')::jsonb)
         WITH ORDINALITY AS e(event, n);

-- What the KPIs are made of, one row per case (for dashboards).
CREATE VIEW {schema}.case_facts AS
SELECT c.id AS case_id, c.queue, c.customer, c.status, c.tier, c.opened_at,
       c.first_response_at, c.resolved_at,
       extract(epoch FROM c.first_response_at - c.opened_at)::bigint AS first_response_secs,
       extract(epoch FROM c.resolved_at - c.opened_at)::bigint       AS resolve_secs,
       c.escalations, c.escalations > 0 AS escalated, c.breached, c.repeat_customer, c.csat,
       c.language
FROM {schema}.cases c;

-- Mail in and out of each case: stored messages ('in') and the mail
-- escalator queued ('out').
CREATE VIEW {schema}.case_mail AS
SELECT m.case_id, 'in'::text AS direction, m.message_id, m.from_address,
       m.subject, coalesce(m.date, m.received_at) AS at, m.size, NULL::text AS state
FROM {schema}.messages m
UNION ALL
SELECT o.case_id, 'out', o.message_id, o.from_address, o.subject,
       coalesce(o.sent_at, o.created_at), r.size, o.state
FROM {schema}.outbox o LEFT JOIN {schema}.raw r ON r.outbox_id = o.id;

-- The OAuth 2 grants (`escalator auth status`), without their sealed tokens.
CREATE VIEW {schema}.oauth_grants AS
SELECT g ->> 'identity'                     AS identity,
       g ->> 'account'                      AS account,
       (g ->> 'valid')::boolean             AS valid,
       (g ->> 'access_expires_at')::timestamptz AS access_expires_at,
       (g ->> 'logged_in_at')::timestamptz  AS logged_in_at,
       (g ->> 'refreshed_at')::timestamptz  AS refreshed_at,
       g ->> 'last_error'                   AS last_error,
       (g ->> 'last_error_at')::timestamptz AS last_error_at,
       (g ->> 'refresh_failures')::bigint   AS refresh_failures
FROM (SELECT replace(convert_from(value, 'UTF8'), '\u0000', '\ufffd')::jsonb AS g
      FROM {schema}.meta WHERE name LIKE 'oauth2/%') grants;
