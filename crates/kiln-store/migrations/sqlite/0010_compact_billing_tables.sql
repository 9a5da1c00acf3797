-- Reservations and monthly spend keyed by their primary keys alone
-- (WITHOUT ROWID), and reservations without their replica index: a
-- request's admission and settlement then write fewer pages. Both tables
-- are small (reservations hold only calls in flight), so the copy is quick
-- and a lease recovery that scans reservations stays cheap.
CREATE TABLE reservations_compact (
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
) WITHOUT ROWID;
INSERT INTO reservations_compact
    SELECT id, replica_id, created_at, tenant_id, key_id, request_id, endpoint, model, backend,
           prompt_tokens, max_completion_tokens, amount_nanos, currency, input_nanos_per_mtok,
           cached_input_nanos_per_mtok, output_nanos_per_mtok
    FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_compact RENAME TO reservations;

-- Settled spend per account (a tenant or a key id) per UTC month (YYYY-MM).
CREATE TABLE monthly_spend_compact (
    account     TEXT    NOT NULL,
    month       TEXT    NOT NULL,
    spent_nanos INTEGER NOT NULL CHECK (spent_nanos >= 0),
    PRIMARY KEY (account, month)
) WITHOUT ROWID;
INSERT INTO monthly_spend_compact SELECT account, month, spent_nanos FROM monthly_spend;
DROP TABLE monthly_spend;
ALTER TABLE monthly_spend_compact RENAME TO monthly_spend;
