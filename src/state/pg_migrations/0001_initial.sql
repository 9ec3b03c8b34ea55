-- The state of several instances, in PostgreSQL: the tables of the SQLite state (its
-- migrations 0001 to 0006, one column type per SQLite affinity) plus the cluster's:
-- leases on portals, instances and config generations. Times are Unix milliseconds of the
-- server's clock, except the leases and instances' times, which PostgreSQL compares itself.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE portals (
    name             TEXT PRIMARY KEY,
    last_attempt_at  BIGINT,
    last_success_at  BIGINT,
    last_result      TEXT,
    last_error       TEXT,
    failures         BIGINT NOT NULL DEFAULT 0,
    retry_at         BIGINT,
    set_fp           TEXT,
    unused           BIGINT,
    total            BIGINT,
    seen_at          BIGINT,
    entry_fp         TEXT,
    last_fire_at     BIGINT,
    failing_since    BIGINT,
    streak_alerted   BIGINT NOT NULL DEFAULT 0,
    account_id       TEXT,
    account_entry_fp TEXT,
    drift_at         BIGINT,
    drifts           BIGINT NOT NULL DEFAULT 0,
    next_due_at      BIGINT,
    next_reason      TEXT,
    watch_retry_at   BIGINT,
    -- The claim: who holds the portal, until when, and the fencing epoch (bumped by every
    -- claim; an intent is written only under the current one).
    lease_owner      TEXT,
    lease_epoch      BIGINT NOT NULL DEFAULT 0,
    lease_until      TIMESTAMPTZ
);

CREATE TABLE journal (
    id            BIGSERIAL PRIMARY KEY,
    portal        TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('rotate', 'resend')),
    phase         TEXT NOT NULL CHECK (phase IN ('intent', 'sealed', 'done', 'aborted')),
    before_fp     TEXT,
    after_fp      TEXT,
    started_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    note          TEXT,
    window_ms     BIGINT,
    checks        BIGINT NOT NULL DEFAULT 0,
    next_check_at BIGINT,
    alerted_at    BIGINT,
    put_deadline  BIGINT
);
CREATE UNIQUE INDEX journal_one_open_intent ON journal (portal) WHERE phase = 'intent';
CREATE INDEX journal_open ON journal (portal, id) WHERE phase IN ('intent', 'sealed');

CREATE TABLE spool (
    id              BIGSERIAL PRIMARY KEY,
    journal_id      BIGINT NOT NULL REFERENCES journal (id),
    portal          TEXT NOT NULL,
    sink            TEXT NOT NULL,
    set_fp          TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    permanent       BIGINT NOT NULL DEFAULT 0,
    alerted_at      BIGINT
);
CREATE INDEX spool_by_target ON spool (portal, sink, id);

CREATE TABLE history (
    id     BIGSERIAL PRIMARY KEY,
    portal TEXT NOT NULL,
    at     BIGINT NOT NULL,
    event  TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX history_by_portal ON history (portal, id);

CREATE TABLE sink_sets (
    portal    TEXT NOT NULL,
    sink      TEXT NOT NULL,
    set_fp    TEXT NOT NULL,
    sealed_at BIGINT NOT NULL,
    PRIMARY KEY (portal, sink)
);

CREATE TABLE notices (
    id         BIGSERIAL PRIMARY KEY,
    portal     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    sent_at    BIGINT
);
CREATE INDEX notices_unsent ON notices (id) WHERE sent_at IS NULL;

-- The instances, and each config file they started with (newest generation wins).
CREATE TABLE nodes (
    name       TEXT PRIMARY KEY,
    version    TEXT NOT NULL,
    config_fp  TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    seen_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE config_generations (
    config_fp     TEXT PRIMARY KEY,
    first_seen_at BIGINT NOT NULL
);
