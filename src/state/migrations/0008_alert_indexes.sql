-- The alert checks run after every job: each reads by an index what may be due, so its
-- cost does not grow with the number of portals or with the journal's history.
CREATE INDEX portals_streaks ON portals (streak_alerted, failures);
CREATE INDEX journal_unalerted_intents ON journal (started_at) WHERE phase = 'intent' AND alerted_at IS NULL;
CREATE INDEX spool_due ON spool (next_attempt_at);
