-- Kiln's schema on PostgreSQL, shared by every `kiln serve` replica: the
-- same tables as SQLite's migrations 0001-0003 end with. Times are unix
-- milliseconds; money is integer nano-units (1e-9) of the platform currency;
-- prices are nano-units per million tokens.

CREATE TABLE platform (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    currency   TEXT    NOT NULL,
    auth_epoch BIGINT  NOT NULL
);
INSERT INTO platform (id, currency, auth_epoch) VALUES (1, 'USD', 0);

CREATE TABLE tenants (
    id                  TEXT    PRIMARY KEY,
    name                TEXT    NOT NULL UNIQUE,
    created_at          BIGINT  NOT NULL,
    disabled_at         BIGINT,
    balance_nanos       BIGINT,
    monthly_limit_nanos BIGINT  CHECK (monthly_limit_nanos >= 0),
    reserved_nanos      BIGINT  NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    requests_per_minute BIGINT  CHECK (requests_per_minute > 0),
    tokens_per_minute   BIGINT  CHECK (tokens_per_minute > 0)
);

CREATE TABLE api_keys (
    id                  TEXT    PRIMARY KEY,
    tenant_id           TEXT    NOT NULL REFERENCES tenants (id),
    name                TEXT    NOT NULL,
    prefix              TEXT    NOT NULL,
    secret_sha256       TEXT    NOT NULL UNIQUE,
    role                TEXT    NOT NULL CHECK (role IN ('platform_admin', 'tenant_admin', 'member')),
    models              TEXT,
    created_at          BIGINT  NOT NULL,
    expires_at          BIGINT,
    revoked_at          BIGINT,
    rotated_at          BIGINT,
    balance_nanos       BIGINT,
    monthly_limit_nanos BIGINT  CHECK (monthly_limit_nanos >= 0),
    reserved_nanos      BIGINT  NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    requests_per_minute BIGINT  CHECK (requests_per_minute > 0),
    tokens_per_minute   BIGINT  CHECK (tokens_per_minute > 0)
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE model_prices (
    model                       TEXT   PRIMARY KEY,
    input_nanos_per_mtok        BIGINT NOT NULL CHECK (input_nanos_per_mtok >= 0),
    cached_input_nanos_per_mtok BIGINT NOT NULL CHECK (cached_input_nanos_per_mtok >= 0),
    output_nanos_per_mtok       BIGINT NOT NULL CHECK (output_nanos_per_mtok >= 0),
    updated_at                  BIGINT NOT NULL
);

CREATE TABLE credit_entries (
    id           TEXT    PRIMARY KEY,
    seq          BIGSERIAL,
    created_at   BIGINT  NOT NULL,
    tenant_id    TEXT    NOT NULL REFERENCES tenants (id),
    key_id       TEXT    REFERENCES api_keys (id),
    kind         TEXT    NOT NULL CHECK (kind IN ('prepaid', 'grant', 'adjustment')),
    amount_nanos BIGINT  NOT NULL,
    note         TEXT    NOT NULL DEFAULT '',
    created_by   TEXT
);
CREATE INDEX credit_entries_tenant ON credit_entries (tenant_id, created_at);

CREATE TABLE monthly_spend (
    account     TEXT   NOT NULL,
    month       TEXT   NOT NULL,
    spent_nanos BIGINT NOT NULL CHECK (spent_nanos >= 0),
    PRIMARY KEY (account, month)
);

CREATE TABLE replicas (
    id               TEXT   PRIMARY KEY,
    started_at       BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);

CREATE TABLE reservations (
    id                          TEXT   PRIMARY KEY,
    replica_id                  TEXT   NOT NULL,
    created_at                  BIGINT NOT NULL,
    tenant_id                   TEXT   NOT NULL REFERENCES tenants (id),
    key_id                      TEXT   REFERENCES api_keys (id),
    request_id                  TEXT   NOT NULL,
    endpoint                    TEXT   NOT NULL,
    model                       TEXT   NOT NULL,
    backend                     TEXT   NOT NULL,
    prompt_tokens               BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    max_completion_tokens       BIGINT NOT NULL CHECK (max_completion_tokens >= 0),
    amount_nanos                BIGINT NOT NULL CHECK (amount_nanos >= 0),
    currency                    TEXT,
    input_nanos_per_mtok        BIGINT,
    cached_input_nanos_per_mtok BIGINT,
    output_nanos_per_mtok       BIGINT
);
CREATE INDEX reservations_replica ON reservations (replica_id);

CREATE TABLE usage_ledger (
    id                          TEXT    PRIMARY KEY,
    seq                         BIGSERIAL,
    created_at                  BIGINT  NOT NULL,
    request_id                  TEXT    NOT NULL,
    endpoint                    TEXT    NOT NULL,
    model                       TEXT    NOT NULL,
    prompt_tokens               BIGINT  NOT NULL CHECK (prompt_tokens >= 0),
    cached_tokens               BIGINT  NOT NULL CHECK (cached_tokens >= 0),
    completion_tokens           BIGINT  NOT NULL CHECK (completion_tokens >= 0),
    outcome                     TEXT    NOT NULL CHECK (
        outcome IN ('ok', 'stop', 'length', 'cancelled') OR outcome LIKE 'error:_%'
    ),
    latency_ms                  BIGINT  NOT NULL CHECK (latency_ms >= 0),
    time_to_first_token_ms      BIGINT  CHECK (time_to_first_token_ms >= 0),
    tenant_id                   TEXT,
    key_id                      TEXT,
    backend                     TEXT    NOT NULL DEFAULT 'embedded',
    currency                    TEXT,
    input_nanos_per_mtok        BIGINT,
    cached_input_nanos_per_mtok BIGINT,
    output_nanos_per_mtok       BIGINT,
    cost_nanos                  BIGINT  NOT NULL DEFAULT 0 CHECK (cost_nanos >= 0)
);
CREATE INDEX usage_ledger_created_at ON usage_ledger (created_at);
CREATE INDEX usage_ledger_model ON usage_ledger (model);
CREATE INDEX usage_ledger_tenant ON usage_ledger (tenant_id, created_at);
CREATE INDEX usage_ledger_key ON usage_ledger (key_id, created_at);

-- Rate-limit buckets shared by replicas: one row per (subject, kind).
CREATE TABLE rate_buckets (
    subject    TEXT             NOT NULL,
    kind       TEXT             NOT NULL CHECK (kind IN ('requests', 'tokens')),
    capacity   DOUBLE PRECISION NOT NULL,
    level      DOUBLE PRECISION NOT NULL,
    updated_at BIGINT           NOT NULL,
    PRIMARY KEY (subject, kind)
);
