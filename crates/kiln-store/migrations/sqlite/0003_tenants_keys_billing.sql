-- Tenants, API keys, prices, credits, budget reservations, and the request
-- log becoming the usage ledger.
--
-- Money is an integer count of nano-units (1e-9) of the platform currency,
-- so sums are exact; prices are nano-units per million tokens.

-- Platform-wide settings that every replica must agree on.
CREATE TABLE platform (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    currency   TEXT    NOT NULL,
    -- Bumped by every change to a tenant or key; replicas poll it and drop
    -- their cache of authenticated keys when it moves.
    auth_epoch INTEGER NOT NULL
);
INSERT INTO platform (id, currency, auth_epoch) VALUES (1, 'USD', 0);

CREATE TABLE tenants (
    id                  TEXT    PRIMARY KEY NOT NULL,   -- ten-<hex>
    name                TEXT    NOT NULL UNIQUE,
    created_at          INTEGER NOT NULL,
    disabled_at         INTEGER,
    -- NULL: no prepaid balance (usage is billed afterwards, not refused).
    balance_nanos       INTEGER,
    monthly_limit_nanos INTEGER CHECK (monthly_limit_nanos >= 0),
    -- Worst-case cost of calls admitted and not yet settled.
    reserved_nanos      INTEGER NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    requests_per_minute INTEGER CHECK (requests_per_minute > 0),
    tokens_per_minute   INTEGER CHECK (tokens_per_minute > 0)
);

CREATE TABLE api_keys (
    id                  TEXT    PRIMARY KEY NOT NULL,   -- key-<hex>
    tenant_id           TEXT    NOT NULL REFERENCES tenants (id),
    name                TEXT    NOT NULL,
    -- The first characters of the secret, shown in listings.
    prefix              TEXT    NOT NULL,
    -- SHA-256 of the whole secret, lowercase hex; the secret itself is
    -- never stored.
    secret_sha256       TEXT    NOT NULL UNIQUE,
    role                TEXT    NOT NULL CHECK (role IN ('platform_admin', 'tenant_admin', 'member')),
    -- JSON array of model names this key may use; NULL: every model.
    models              TEXT,
    created_at          INTEGER NOT NULL,
    expires_at          INTEGER,
    revoked_at          INTEGER,
    rotated_at          INTEGER,
    balance_nanos       INTEGER,
    monthly_limit_nanos INTEGER CHECK (monthly_limit_nanos >= 0),
    reserved_nanos      INTEGER NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    requests_per_minute INTEGER CHECK (requests_per_minute > 0),
    tokens_per_minute   INTEGER CHECK (tokens_per_minute > 0)
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE model_prices (
    model                       TEXT    PRIMARY KEY NOT NULL,
    input_nanos_per_mtok        INTEGER NOT NULL CHECK (input_nanos_per_mtok >= 0),
    cached_input_nanos_per_mtok INTEGER NOT NULL CHECK (cached_input_nanos_per_mtok >= 0),
    output_nanos_per_mtok       INTEGER NOT NULL CHECK (output_nanos_per_mtok >= 0),
    updated_at                  INTEGER NOT NULL
);

-- Every change to a balance: prepaid credit, a grant, or an adjustment.
CREATE TABLE credit_entries (
    id           TEXT    PRIMARY KEY NOT NULL,
    created_at   INTEGER NOT NULL,
    tenant_id    TEXT    NOT NULL REFERENCES tenants (id),
    key_id       TEXT    REFERENCES api_keys (id),      -- NULL: the tenant's balance
    kind         TEXT    NOT NULL CHECK (kind IN ('prepaid', 'grant', 'adjustment')),
    amount_nanos INTEGER NOT NULL,
    note         TEXT    NOT NULL DEFAULT '',
    created_by   TEXT                                   -- the admin key that made it
);
CREATE INDEX credit_entries_tenant ON credit_entries (tenant_id, created_at);

-- Settled spend per account (a tenant or a key id) per UTC month (YYYY-MM).
CREATE TABLE monthly_spend (
    account     TEXT    NOT NULL,
    month       TEXT    NOT NULL,
    spent_nanos INTEGER NOT NULL CHECK (spent_nanos >= 0),
    PRIMARY KEY (account, month)
);

-- Each running `kiln serve` holds a lease it renews; its reservations are
-- settled by anyone else only after the lease lapsed.
CREATE TABLE replicas (
    id               TEXT    PRIMARY KEY NOT NULL,
    started_at       INTEGER NOT NULL,
    lease_expires_at INTEGER NOT NULL
);

-- A call admitted and not yet settled: its worst-case cost is held against
-- the tenant's (and the key's) budget until it ends.
CREATE TABLE reservations (
    id                    TEXT    PRIMARY KEY NOT NULL,   -- becomes the ledger row's id
    replica_id            TEXT    NOT NULL,
    created_at            INTEGER NOT NULL,
    tenant_id             TEXT    NOT NULL REFERENCES tenants (id),
    key_id                TEXT    REFERENCES api_keys (id),
    request_id            TEXT    NOT NULL,
    endpoint              TEXT    NOT NULL,
    model                 TEXT    NOT NULL,
    backend               TEXT    NOT NULL,
    prompt_tokens         INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    max_completion_tokens INTEGER NOT NULL CHECK (max_completion_tokens >= 0),
    amount_nanos          INTEGER NOT NULL CHECK (amount_nanos >= 0),
    -- The prices the call was admitted at, so settlement charges the same.
    currency                    TEXT,
    input_nanos_per_mtok        INTEGER,
    cached_input_nanos_per_mtok INTEGER,
    output_nanos_per_mtok       INTEGER
);
CREATE INDEX reservations_replica ON reservations (replica_id);

-- The request log becomes the usage ledger: who was charged what, at which
-- prices. Earlier rows belong to no tenant and cost nothing.
ALTER TABLE request_log RENAME TO usage_ledger;
ALTER TABLE usage_ledger ADD COLUMN tenant_id TEXT;
ALTER TABLE usage_ledger ADD COLUMN key_id TEXT;
ALTER TABLE usage_ledger ADD COLUMN backend TEXT NOT NULL DEFAULT 'embedded';
ALTER TABLE usage_ledger ADD COLUMN currency TEXT;
ALTER TABLE usage_ledger ADD COLUMN input_nanos_per_mtok INTEGER;
ALTER TABLE usage_ledger ADD COLUMN cached_input_nanos_per_mtok INTEGER;
ALTER TABLE usage_ledger ADD COLUMN output_nanos_per_mtok INTEGER;
ALTER TABLE usage_ledger ADD COLUMN cost_nanos INTEGER NOT NULL DEFAULT 0 CHECK (cost_nanos >= 0);
CREATE INDEX usage_ledger_tenant ON usage_ledger (tenant_id, created_at);
CREATE INDEX usage_ledger_key ON usage_ledger (key_id, created_at);
