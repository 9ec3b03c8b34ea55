-- Every command looks up the open journal entries of each portal it touches; without an
-- index that is a scan of the whole journal per portal, and the journal only grows.
CREATE INDEX journal_open ON journal (portal, id) WHERE phase IN ('intent', 'sealed');
