-- Several instances (PostgreSQL): the time after which the instance that wrote an intent
-- sends no PUT for it. SQLite leaves it NULL: the portal's flock dies with its process.
ALTER TABLE journal ADD COLUMN put_deadline INTEGER;
