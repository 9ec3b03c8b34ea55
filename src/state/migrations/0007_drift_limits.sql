-- Drift found per portal, and whether it was acted on (resend or rotate): at most 2 actions
-- in a rolling hour; beyond that the portal is flapping (SPEC §6). A 429's pause is kept
-- with the portal, so `status` shows it and a restarted process honours it.
CREATE TABLE drift_log (
    portal TEXT NOT NULL,
    at     INTEGER NOT NULL,
    acted  INTEGER NOT NULL
);
CREATE INDEX drift_log_by_portal ON drift_log (portal, at);
ALTER TABLE portals ADD COLUMN flapping_since INTEGER;
ALTER TABLE portals ADD COLUMN paused_until INTEGER;
