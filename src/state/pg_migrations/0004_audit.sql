-- As SQLite's 0009: the audit chain and the webhook cursors. `sha256hex` is the function
-- SQLite's connections register, so that one set of statements chains on both.
CREATE FUNCTION sha256hex(t TEXT) RETURNS TEXT
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT encode(sha256(convert_to(t, 'UTF8')), 'hex') $$;
ALTER TABLE history ADD COLUMN uuid TEXT;
ALTER TABLE history ADD COLUMN record TEXT;
ALTER TABLE history ADD COLUMN prev TEXT;
ALTER TABLE history ADD COLUMN hash TEXT;
-- A delivery's sink, as in the record: the webhooks' look for pending events skips their
-- own deliveries by it.
ALTER TABLE history ADD COLUMN sink TEXT;
ALTER TABLE portals ADD COLUMN history_head TEXT;
ALTER TABLE portals ADD COLUMN history_prev TEXT;

CREATE TABLE webhook_cursors (
    sink            TEXT NOT NULL,
    portal          TEXT NOT NULL,
    after_id        BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    PRIMARY KEY (sink, portal)
);
