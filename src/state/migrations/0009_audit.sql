-- The audit record (SPEC §6): each history row holds its record's canonical JSON, the hash
-- of its portal's previous record and its own (SHA-256 of the previous hash and the JSON),
-- and each portal's row its chain's head (and the head's `prev`, which the next append
-- reads under the row's lock). Rows of older versions are chained by the migration code.
ALTER TABLE history ADD COLUMN uuid TEXT;
ALTER TABLE history ADD COLUMN record TEXT;
ALTER TABLE history ADD COLUMN prev TEXT;
ALTER TABLE history ADD COLUMN hash TEXT;
-- A delivery's sink, as in the record: the webhooks' look for pending events skips their
-- own deliveries by it.
ALTER TABLE history ADD COLUMN sink TEXT;
ALTER TABLE portals ADD COLUMN history_head TEXT;
ALTER TABLE portals ADD COLUMN history_prev TEXT;

-- Where each webhook sink is in each portal's history: the records after `after_id` are
-- its pending events (delivered in order); the history itself is the spool.
CREATE TABLE webhook_cursors (
    sink            TEXT NOT NULL,
    portal          TEXT NOT NULL,
    after_id        INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    PRIMARY KEY (sink, portal)
);
