-- The planner's answer per portal (SPEC §6): when it is next due and why, kept in the state
-- rather than only in the daemon's memory, and when the next watch read may be tried after
-- a failed one.
ALTER TABLE portals ADD COLUMN next_due_at INTEGER;
ALTER TABLE portals ADD COLUMN next_reason TEXT;
ALTER TABLE portals ADD COLUMN watch_retry_at INTEGER;
