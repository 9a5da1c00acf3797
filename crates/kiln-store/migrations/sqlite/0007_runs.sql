-- Agents and workflows as tenants declare them, and the journal of their
-- durable runs. Times are unix milliseconds; bodies, inputs, outputs and
-- results are JSON text.

-- Every version of every definition. Saving a changed body adds the next
-- version; versions are never edited or deleted, because runs stay pinned
-- to the one they started on.
CREATE TABLE definitions (
    tenant_id  TEXT    NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('agent', 'workflow')),
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL CHECK (version >= 1),
    body       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT,                                    -- the key that saved it
    -- Set on every version when the definition is retired: hidden from new
    -- runs, still found by the runs pinned to it.
    retired_at INTEGER,
    PRIMARY KEY (tenant_id, kind, name, version)
);

-- A run of one version of a definition. `owner` is the replica working on
-- it (a row of `replicas` while its lease holds); NULL when it was let go.
-- Another replica takes over a `running` run only once its owner's lease
-- lapsed.
CREATE TABLE runs (
    id               TEXT    PRIMARY KEY NOT NULL,      -- run-<uuid>
    tenant_id        TEXT    NOT NULL,
    key_id           TEXT,                              -- charged for every inner call
    kind             TEXT    NOT NULL CHECK (kind IN ('agent', 'workflow')),
    name             TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    input            TEXT    NOT NULL,
    status           TEXT    NOT NULL
        CHECK (status IN ('running', 'waiting', 'succeeded', 'failed', 'cancelled')),
    result           TEXT,
    error            TEXT,
    owner            TEXT,
    -- Asked to stop; the owner ends it before its next step.
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    -- Steps finished so far.
    steps            INTEGER NOT NULL DEFAULT 0 CHECK (steps >= 0),
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER
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
    seq             INTEGER NOT NULL CHECK (seq >= 0),
    kind            TEXT    NOT NULL,                   -- model, tool, ...
    name            TEXT    NOT NULL,
    input           TEXT    NOT NULL,
    output          TEXT,
    state           TEXT    NOT NULL CHECK (state IN ('started', 'done', 'failed')),
    idempotency_key TEXT    NOT NULL,
    -- One more each time a new owner begins the step again.
    attempts        INTEGER NOT NULL CHECK (attempts >= 1),
    started_at      INTEGER NOT NULL,
    finished_at     INTEGER,
    PRIMARY KEY (run_id, seq)
);
