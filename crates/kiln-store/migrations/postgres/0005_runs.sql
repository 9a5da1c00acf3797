-- Agents and workflows as tenants declare them, and the journal of their
-- durable runs: the same tables as SQLite's migration 0007. Times are unix
-- milliseconds; bodies, inputs, outputs and results are JSON text.

-- Every version of every definition. Saving a changed body adds the next
-- version; versions are never edited or deleted, because runs stay pinned
-- to the one they started on. Replicas saving one definition at once take
-- turns on an advisory lock; the primary key is the last guard.
CREATE TABLE definitions (
    tenant_id  TEXT    NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('agent', 'workflow')),
    name       TEXT    NOT NULL,
    version    BIGINT  NOT NULL CHECK (version >= 1),
    body       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    created_by TEXT,                                    -- the key that saved it
    -- Set on every version when the definition is retired: hidden from new
    -- runs, still found by the runs pinned to it.
    retired_at BIGINT,
    PRIMARY KEY (tenant_id, kind, name, version)
);

-- A run of one version of a definition. `owner` is the replica working on
-- it (a row of `replicas` while its lease holds); NULL when it was let go.
-- Another replica takes over a `running` run only once its owner's lease
-- lapsed; every owner-checked write locks the run's row first.
CREATE TABLE runs (
    id               TEXT    PRIMARY KEY,               -- run-<uuid>
    tenant_id        TEXT    NOT NULL,
    key_id           TEXT,                              -- charged for every inner call
    kind             TEXT    NOT NULL CHECK (kind IN ('agent', 'workflow')),
    name             TEXT    NOT NULL,
    version          BIGINT  NOT NULL,
    input            TEXT    NOT NULL,
    status           TEXT    NOT NULL
        CHECK (status IN ('running', 'waiting', 'succeeded', 'failed', 'cancelled')),
    result           TEXT,
    error            TEXT,
    owner            TEXT,
    -- Asked to stop; the owner ends it before its next step.
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    -- Steps finished so far.
    steps            BIGINT  NOT NULL DEFAULT 0 CHECK (steps >= 0),
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    finished_at      BIGINT
);
CREATE INDEX runs_tenant ON runs (tenant_id, created_at);
-- Claiming looks for `running` runs, oldest first.
CREATE INDEX runs_status ON runs (status, created_at);

-- The step journal: a step is written `started` before it runs and
-- `done` or `failed` after, so a replica taking a run over knows which
-- steps' effects already happened. `idempotency_key` is `<run id>:<seq>`
-- on every attempt, for tools that deduplicate by it.
CREATE TABLE run_steps (
    run_id          TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq             BIGINT  NOT NULL CHECK (seq >= 0),
    kind            TEXT    NOT NULL,                   -- model, tool, ...
    name            TEXT    NOT NULL,
    input           TEXT    NOT NULL,
    output          TEXT,
    state           TEXT    NOT NULL CHECK (state IN ('started', 'done', 'failed')),
    idempotency_key TEXT    NOT NULL,
    -- One more each time a new owner begins the step again.
    attempts        BIGINT  NOT NULL CHECK (attempts >= 1),
    started_at      BIGINT  NOT NULL,
    finished_at     BIGINT,
    PRIMARY KEY (run_id, seq)
);
