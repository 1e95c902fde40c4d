-- escalator's store on PostgreSQL, version 1: the same key spaces
-- ("trees") as the embedded engine, one row per key. Keys and values are
-- the store's own encoding (src/store/codec.rs); bytea compares byte by
-- byte, so a range of keys is a range of rows in the primary key's order.
CREATE TABLE escalator_kv (
    tree  smallint NOT NULL,
    key   bytea    NOT NULL,
    value bytea    NOT NULL,
    PRIMARY KEY (tree, key)
);
