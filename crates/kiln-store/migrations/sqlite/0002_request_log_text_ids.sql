-- Call ids become text, unique without a shared counter (PostgreSQL replicas
-- will write the same log); `ttft_ms` is renamed `time_to_first_token_ms`;
-- `outcome` is checked. Rows written under 0001 keep their number as
-- `legacy-<n>`.
CREATE TABLE request_log_v2 (
    id                     TEXT    PRIMARY KEY NOT NULL,
    created_at             INTEGER NOT NULL,   -- unix milliseconds
    request_id             TEXT    NOT NULL,
    endpoint               TEXT    NOT NULL,   -- chat.completions | completions | embeddings
    model                  TEXT    NOT NULL,
    prompt_tokens          INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    cached_tokens          INTEGER NOT NULL CHECK (cached_tokens >= 0),
    completion_tokens      INTEGER NOT NULL CHECK (completion_tokens >= 0),
    outcome                TEXT    NOT NULL CHECK (
        outcome IN ('ok', 'stop', 'length', 'cancelled')
        OR (outcome LIKE 'error:_%')
    ),
    latency_ms             INTEGER NOT NULL CHECK (latency_ms >= 0),
    time_to_first_token_ms INTEGER CHECK (time_to_first_token_ms >= 0)
);

INSERT INTO request_log_v2 (id, created_at, request_id, endpoint, model, prompt_tokens,
        cached_tokens, completion_tokens, outcome, latency_ms, time_to_first_token_ms)
    SELECT printf('legacy-%d', id), created_at, request_id, endpoint, model, prompt_tokens,
           cached_tokens, completion_tokens, outcome, latency_ms, ttft_ms
    FROM request_log
    ORDER BY id;

DROP TABLE request_log;
ALTER TABLE request_log_v2 RENAME TO request_log;

CREATE INDEX request_log_created_at ON request_log (created_at);
CREATE INDEX request_log_model ON request_log (model);
