-- escalator's store on PostgreSQL, version 2: what the nodes of a cluster
-- share besides the store itself. Times come from the database's clock
-- (now()), never a node's: nodes may disagree about the time, the server
-- is one.

-- Every running daemon, seen each third of the lease.
CREATE TABLE escalator_nodes (
    node       text        PRIMARY KEY,
    host       text        NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL
);

-- Who watches which mailbox (queue), until when. `token` is the fencing
-- token: it grows with every new holder, and every write that depends on
-- the mailbox checks it in its own transaction.
CREATE SEQUENCE escalator_lease_tokens;
CREATE TABLE escalator_leases (
    mailbox     text        PRIMARY KEY,
    holder      text        NOT NULL,
    token       bigint      NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
