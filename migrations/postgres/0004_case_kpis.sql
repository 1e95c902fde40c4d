-- escalator's store on PostgreSQL, version 4: the KPI facts one row per
-- case with typed columns, so `stats`, the digest and a dashboard compute
-- KPIs in SQL. Version 3 kept them in packed buckets of 64 cases that
-- every write of any of those cases rewrote; a node converts those rows
-- into one row per case when it opens the store (src/store/facts.rs).
--
-- A case's time at each tier (its stints) is kept as parallel arrays, the
-- n-th element of each describing the n-th stint; the view case_stints
-- has one row per stint. What `stats` counts is also kept as scalars
-- (seconds, flags), computed by the daemon as it counts them itself: a
-- million rows are counted without taking arrays apart.

ALTER TABLE {schema}.facts
    ADD COLUMN case_id                  bigint,
    ADD COLUMN queue                    text,
    ADD COLUMN tier                     text,
    ADD COLUMN status                   text,
    ADD COLUMN opened_at                timestamptz,
    ADD COLUMN first_response_at        timestamptz,
    ADD COLUMN resolved_at              timestamptz,
    ADD COLUMN first_response_secs      bigint,
    ADD COLUMN resolve_secs             bigint,
    ADD COLUMN escalated                boolean,
    ADD COLUMN escalated_stale          boolean,
    ADD COLUMN escalated_repeat_customer boolean,
    ADD COLUMN escalated_trigger        boolean,
    ADD COLUMN escalated_manual         boolean,
    ADD COLUMN breached                 boolean,
    ADD COLUMN repeat_customer          boolean,
    ADD COLUMN csat                     smallint,
    ADD COLUMN bounces                  bigint,
    ADD COLUMN stint_tier               text[],
    ADD COLUMN stint_entered_at         timestamptz[],
    ADD COLUMN stint_first_response_at  timestamptz[],
    ADD COLUMN stint_first_response_secs bigint[],
    ADD COLUMN stint_left_at            timestamptz[],
    ADD COLUMN stint_left_reason        text[],
    ADD COLUMN stint_deadline_missed    boolean[],
    ADD COLUMN triggers                 text[];

-- Only per-case rows from now on (`k` ++ case id): a node of an older
-- release still running would write a bucket, and fails instead of
-- writing facts this release no longer reads. The buckets already there
-- are left for the conversion to take away (NOT VALID skips them).
ALTER TABLE {schema}.facts
    ADD CONSTRAINT facts_per_case CHECK (get_byte(key, 0) = 107) NOT VALID;

-- Which node claimed an outgoing mail last (sending it, or the one that
-- sent it or gave up).
ALTER TABLE {schema}.outbox ADD COLUMN claimed_by text;

-- The index version 8 (src/store/mod.rs, build_indexes) with the schema
-- that needs it: a node of the release before, started from now on,
-- rebuilds its indexes, is refused its first facts bucket and stops.
UPDATE {schema}.meta SET value = '\x38'::bytea
    WHERE key = 'indexes'::bytea AND value = '\x37'::bytea;

-- A window of cases by opening time (`stats --since`, the digest), and
-- the unresolved ones for their ages.
CREATE INDEX facts_opened_at ON {schema}.facts (opened_at) WHERE case_id IS NOT NULL;
CREATE INDEX facts_unresolved ON {schema}.facts (opened_at)
    WHERE case_id IS NOT NULL AND status <> 'resolved';

-- One row per stint: a case's time at one tier, in order (position 1 is
-- where it opened). left_reason is why it moved on (stale,
-- repeat_customer, trigger, manual), NULL while the case is still there.
CREATE VIEW {schema}.case_stints AS
SELECT f.case_id, s.position, s.tier, s.entered_at, s.first_response_at,
       s.left_at, s.left_reason, s.deadline_missed
FROM {schema}.facts f,
     unnest(f.stint_tier, f.stint_entered_at, f.stint_first_response_at,
            f.stint_left_at, f.stint_left_reason, f.stint_deadline_missed)
         WITH ORDINALITY AS s(tier, entered_at, first_response_at, left_at, left_reason,
                              deadline_missed, position)
WHERE f.case_id IS NOT NULL;
