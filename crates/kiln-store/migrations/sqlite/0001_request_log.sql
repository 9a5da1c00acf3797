-- One row per model call (chat, completion, embedding), written when the
-- call finishes. Token counts are what the tenant is charged for.
CREATE TABLE request_log (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at        INTEGER NOT NULL,          -- unix milliseconds
    request_id        TEXT    NOT NULL,
    endpoint          TEXT    NOT NULL,          -- e.g. /v1/chat/completions
    model             TEXT    NOT NULL,
    prompt_tokens     INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    cached_tokens     INTEGER NOT NULL CHECK (cached_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    outcome           TEXT    NOT NULL,          -- stop | length | cancelled | error:<code>
    latency_ms        INTEGER NOT NULL CHECK (latency_ms >= 0),
    ttft_ms           INTEGER CHECK (ttft_ms >= 0)
);

CREATE INDEX request_log_created_at ON request_log (created_at);
CREATE INDEX request_log_model ON request_log (model);
