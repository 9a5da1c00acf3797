-- Where each knowledge base is served: the replica holding its files (its
-- advertised URL, NULL when it advertises none). Names are unique within a
-- tenant across all replicas.
CREATE TABLE knowledge_bases (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    replica_url TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);
