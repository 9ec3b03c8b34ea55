-- Alerts: when a failure streak began and whether it was announced; whether a long-pending
-- payload was announced. Each is announced once.
ALTER TABLE portals ADD COLUMN failing_since INTEGER;
ALTER TABLE portals ADD COLUMN streak_alerted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE spool ADD COLUMN alerted_at INTEGER;
