-- The knowledge-base groups a key belongs to (a JSON array of names): a
-- document restricted to groups is visible only to keys in one of them.
ALTER TABLE api_keys ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
