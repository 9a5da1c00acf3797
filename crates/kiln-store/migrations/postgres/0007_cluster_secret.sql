-- A secret shared by every replica of this database, made by the first one
-- that needs it: replicas sign the requests they send each other on a
-- run's behalf (a run's knowledge-base search) with it.
ALTER TABLE platform ADD COLUMN cluster_secret TEXT;
