-- Convergence (SPEC §4). An intent whose PUT had an unknown outcome stays open and is
-- settled by GETs spread over its settle window; `window_ms` is the window it was opened
-- with, `checks` the GETs made, `next_check_at` when the next one is due, `alerted_at` when
-- an intent open for twice its window was announced.
ALTER TABLE journal ADD COLUMN window_ms INTEGER;
ALTER TABLE journal ADD COLUMN checks INTEGER NOT NULL DEFAULT 0;
ALTER TABLE journal ADD COLUMN next_check_at INTEGER;
ALTER TABLE journal ADD COLUMN alerted_at INTEGER;

-- Per portal and sink, the keyed fingerprint of the newest set sealed for that sink
-- (delivered or still pending): what the sink holds, or will. A GET that shows another set
-- while no intent is open is drift. `sink = '*'` stands for every sink of the portal: the
-- upgrade knows the last set sealed, not which sinks the config named then.
CREATE TABLE sink_sets (
    portal    TEXT NOT NULL,
    sink      TEXT NOT NULL,
    set_fp    TEXT NOT NULL,
    sealed_at INTEGER NOT NULL,
    PRIMARY KEY (portal, sink)
);
-- Filled from the last rotation, so an upgrade resends nothing.
INSERT INTO sink_sets (portal, sink, set_fp, sealed_at)
    SELECT j.portal, '*', j.after_fp, j.updated_at FROM journal j
    WHERE j.after_fp IS NOT NULL
      AND j.id = (SELECT MAX(k.id) FROM journal k WHERE k.portal = j.portal AND k.after_fp IS NOT NULL);
INSERT OR REPLACE INTO sink_sets (portal, sink, set_fp, sealed_at)
    SELECT s.portal, s.sink, s.set_fp, s.created_at FROM spool s
    WHERE s.id = (SELECT MAX(t.id) FROM spool t WHERE t.portal = s.portal AND t.sink = s.sink);

-- The account behind a portal's entry, pinned at its first rotation with the entry it was
-- pinned under; drift found (when, how often).
ALTER TABLE portals ADD COLUMN account_id TEXT;
ALTER TABLE portals ADD COLUMN account_entry_fp TEXT;
ALTER TABLE portals ADD COLUMN drift_at INTEGER;
ALTER TABLE portals ADD COLUMN drifts INTEGER NOT NULL DEFAULT 0;

-- Notices for [alerts] that are not tied to a streak or a payload: drift, a key that acts
-- as another account. Each is sent once.
CREATE TABLE notices (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    portal     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    sent_at    INTEGER
);
CREATE INDEX notices_unsent ON notices (id) WHERE sent_at IS NULL;
