-- As SQLite's 0008: the alert checks and the next delivery read by an index.
CREATE INDEX portals_streaks ON portals (streak_alerted, failures);
CREATE INDEX journal_unalerted_intents ON journal (started_at) WHERE phase = 'intent' AND alerted_at IS NULL;
CREATE INDEX spool_due ON spool (next_attempt_at);
