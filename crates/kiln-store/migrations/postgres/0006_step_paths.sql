-- A step's path: its readable name within its run (`classify`, `each[2]`,
-- `research/3`); the same column as SQLite's migration 0008. Workflows name
-- their steps by path and find them in the journal by it; `seq` stays the
-- key. NULL on steps journaled before paths existed, which read back with
-- their seq as their path.
ALTER TABLE run_steps ADD COLUMN path TEXT;
