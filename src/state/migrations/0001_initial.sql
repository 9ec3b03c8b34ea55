-- Times are Unix milliseconds. Fingerprints are keyed hashes, never codes.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- What the last runs found and did, one row per portal.
CREATE TABLE portals (
    name            TEXT PRIMARY KEY,
    last_attempt_at INTEGER,
    last_success_at INTEGER,
    last_result     TEXT,
    last_error      TEXT,
    failures        INTEGER NOT NULL DEFAULT 0,
    retry_at        INTEGER,
    set_fp          TEXT,
    unused          INTEGER,
    total           INTEGER,
    seen_at         INTEGER,
    entry_fp        TEXT,
    last_fire_at    INTEGER
);

-- The rotation journal: an `intent` row is written (and fsync'd) before the PUT; it becomes
-- `sealed` in the same transaction that stores the payloads, `aborted` when a GET proves the
-- PUT did not happen, and `done` after delivery was attempted.
CREATE TABLE journal (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    portal     TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('rotate', 'resend')),
    phase      TEXT NOT NULL CHECK (phase IN ('intent', 'sealed', 'done', 'aborted')),
    before_fp  TEXT,
    after_fp   TEXT,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    note       TEXT
);
CREATE UNIQUE INDEX journal_one_open_intent ON journal (portal) WHERE phase = 'intent';

-- Sealed payloads waiting for delivery: encrypted for encrypted sinks, plain text only for a
-- plain-text file sink. A row goes once delivered, or once a newer set for the same portal
-- and sink has been delivered.
CREATE TABLE spool (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    journal_id      INTEGER NOT NULL REFERENCES journal (id),
    portal          TEXT NOT NULL,
    sink            TEXT NOT NULL,
    set_fp          TEXT NOT NULL,
    payload         BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    permanent       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX spool_by_target ON spool (portal, sink, id);

CREATE TABLE history (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    portal TEXT NOT NULL,
    at     INTEGER NOT NULL,
    event  TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX history_by_portal ON history (portal, id);
