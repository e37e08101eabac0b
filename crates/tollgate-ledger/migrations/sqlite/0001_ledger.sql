-- Tollgate ledger, SQLite. Money is INTEGER micro-credits and instants INTEGER milliseconds
-- since the Unix epoch (SQLite has no exact decimal type; see docs/ledger.md).

CREATE TABLE accounts (
    account_id      TEXT PRIMARY KEY,
    overdraft_limit INTEGER NOT NULL CHECK (overdraft_limit >= 0),
    debt            INTEGER NOT NULL CHECK (debt >= 0),
    balance         INTEGER NOT NULL,
    granted         INTEGER NOT NULL,
    debited         INTEGER NOT NULL,
    refunded        INTEGER NOT NULL,
    expired         INTEGER NOT NULL,
    voided          INTEGER NOT NULL,
    adjusted        INTEGER NOT NULL,
    entry_count     INTEGER NOT NULL CHECK (entry_count >= 0),
    last_hash       TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

CREATE TABLE grants (
    account_id   TEXT NOT NULL REFERENCES accounts (account_id),
    grant_id     TEXT NOT NULL,
    amount       INTEGER NOT NULL CHECK (amount > 0),
    remaining    INTEGER NOT NULL,
    priority     INTEGER NOT NULL,
    effective_at INTEGER NOT NULL,
    expires_at   INTEGER,
    scope        TEXT NOT NULL,
    source       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('open', 'expired', 'voided')),
    cost_basis   TEXT,
    external_ref TEXT,
    metadata     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (account_id, grant_id)
);
CREATE INDEX grants_open ON grants (account_id) WHERE state = 'open';

-- Debits by id: the uniqueness that makes replayed usage harmless, and what refunds read.
CREATE TABLE debits (
    account_id         TEXT NOT NULL REFERENCES accounts (account_id),
    debit_id           TEXT NOT NULL,
    feature            TEXT NOT NULL,
    event_at           INTEGER NOT NULL,
    amount             INTEGER NOT NULL,
    overdraft          INTEGER NOT NULL,
    refunded_overdraft INTEGER NOT NULL,
    draws              TEXT NOT NULL,
    price_version      INTEGER,
    price_rule         TEXT,
    actor              TEXT,
    region             TEXT,
    idempotency_key    TEXT,
    recorded_at        INTEGER NOT NULL,
    PRIMARY KEY (account_id, debit_id)
);

CREATE TABLE ledger_entries (
    account_id    TEXT NOT NULL REFERENCES accounts (account_id),
    seq           INTEGER NOT NULL CHECK (seq > 0),
    kind          TEXT NOT NULL,
    amount        INTEGER NOT NULL,
    grant_id      TEXT,
    debit_id      TEXT,
    operation     TEXT NOT NULL,
    feature       TEXT,
    actor         TEXT,
    region        TEXT,
    price_version INTEGER,
    price_rule    TEXT,
    memo          TEXT NOT NULL,
    event_at      INTEGER NOT NULL,
    recorded_at   INTEGER NOT NULL,
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL,
    PRIMARY KEY (account_id, seq)
);
CREATE INDEX ledger_entries_debit ON ledger_entries (account_id, debit_id)
    WHERE debit_id IS NOT NULL;
CREATE INDEX ledger_entries_grant ON ledger_entries (account_id, grant_id)
    WHERE grant_id IS NOT NULL;

-- Entries are append-only: the database itself refuses to change or remove one.
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger entries are append-only');
END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger entries are append-only');
END;

CREATE TABLE idempotency (
    idempotency_key TEXT PRIMARY KEY,
    operation       TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    result          TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);
CREATE INDEX idempotency_created ON idempotency (created_at);
