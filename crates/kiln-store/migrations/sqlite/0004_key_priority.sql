-- A key's scheduling priority: the highest a request made with it may ask
-- for (requests may lower their own). -100 (background) to 100.
ALTER TABLE api_keys ADD COLUMN priority INTEGER NOT NULL DEFAULT 0
    CHECK (priority BETWEEN -100 AND 100);
