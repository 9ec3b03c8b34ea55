-- As SQLite's 0007: drift actions counted in a rolling hour, flapping, a 429's pause.
CREATE TABLE drift_log (
    portal TEXT NOT NULL,
    at     BIGINT NOT NULL,
    acted  BIGINT NOT NULL
);
CREATE INDEX drift_log_by_portal ON drift_log (portal, at);
ALTER TABLE portals ADD COLUMN flapping_since BIGINT;
ALTER TABLE portals ADD COLUMN paused_until BIGINT;
