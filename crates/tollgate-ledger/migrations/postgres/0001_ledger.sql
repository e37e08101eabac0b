-- Tollgate ledger, PostgreSQL. Money is NUMERIC(38,6), instants are timestamptz (millisecond
-- values). The store binds integer micro-credits and milliseconds and converts with the four
-- functions below, so both backends share one set of queries.

CREATE FUNCTION tg_credits(micros BIGINT) RETURNS NUMERIC
    LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE
    RETURN micros::NUMERIC / 1000000;

CREATE FUNCTION tg_micros(amount NUMERIC) RETURNS BIGINT
    LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE
    RETURN (amount * 1000000)::BIGINT;

CREATE FUNCTION tg_time(ms BIGINT) RETURNS TIMESTAMPTZ
    LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE
    RETURN TIMESTAMPTZ 'epoch' + ms * INTERVAL '1 millisecond';

CREATE FUNCTION tg_ms(at TIMESTAMPTZ) RETURNS BIGINT
    LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE
    RETURN (EXTRACT(EPOCH FROM at) * 1000)::BIGINT;

-- One row per account: the balance and every term of the balance equation, kept current in
-- the same transaction as the entries, and the head of the account's hash chain.
CREATE TABLE accounts (
    account_id      TEXT PRIMARY KEY,
    overdraft_limit NUMERIC(38,6) NOT NULL CHECK (overdraft_limit >= 0),
    debt            NUMERIC(38,6) NOT NULL CHECK (debt >= 0),
    balance         NUMERIC(38,6) NOT NULL,
    granted         NUMERIC(38,6) NOT NULL,
    debited         NUMERIC(38,6) NOT NULL,
    refunded        NUMERIC(38,6) NOT NULL,
    expired         NUMERIC(38,6) NOT NULL,
    voided          NUMERIC(38,6) NOT NULL,
    adjusted        NUMERIC(38,6) NOT NULL,
    entry_count     BIGINT NOT NULL CHECK (entry_count >= 0),
    last_hash       TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE grants (
    account_id   TEXT NOT NULL REFERENCES accounts (account_id),
    grant_id     TEXT NOT NULL,
    amount       NUMERIC(38,6) NOT NULL CHECK (amount > 0),
    remaining    NUMERIC(38,6) NOT NULL,
    priority     BIGINT NOT NULL,
    effective_at TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ,
    scope        TEXT NOT NULL,
    source       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('open', 'expired', 'voided')),
    cost_basis   TEXT,
    external_ref TEXT,
    metadata     TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (account_id, grant_id)
);
CREATE INDEX grants_open ON grants (account_id) WHERE state = 'open';

-- Debits by id: the uniqueness that makes replayed usage harmless, and what refunds read.
CREATE TABLE debits (
    account_id         TEXT NOT NULL REFERENCES accounts (account_id),
    debit_id           TEXT NOT NULL,
    feature            TEXT NOT NULL,
    event_at           TIMESTAMPTZ NOT NULL,
    amount             NUMERIC(38,6) NOT NULL,
    overdraft          NUMERIC(38,6) NOT NULL,
    refunded_overdraft NUMERIC(38,6) NOT NULL,
    draws              TEXT NOT NULL,
    price_version      BIGINT,
    price_rule         TEXT,
    actor              TEXT,
    region             TEXT,
    idempotency_key    TEXT,
    recorded_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (account_id, debit_id)
);

CREATE TABLE ledger_entries (
    account_id    TEXT NOT NULL REFERENCES accounts (account_id),
    seq           BIGINT NOT NULL CHECK (seq > 0),
    kind          TEXT NOT NULL,
    amount        NUMERIC(38,6) NOT NULL,
    grant_id      TEXT,
    debit_id      TEXT,
    operation     TEXT NOT NULL,
    feature       TEXT,
    actor         TEXT,
    region        TEXT,
    price_version BIGINT,
    price_rule    TEXT,
    memo          TEXT NOT NULL,
    event_at      TIMESTAMPTZ NOT NULL,
    recorded_at   TIMESTAMPTZ NOT NULL,
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL,
    PRIMARY KEY (account_id, seq)
);
CREATE INDEX ledger_entries_debit ON ledger_entries (account_id, debit_id)
    WHERE debit_id IS NOT NULL;
CREATE INDEX ledger_entries_grant ON ledger_entries (account_id, grant_id)
    WHERE grant_id IS NOT NULL;

-- Entries are append-only: the database itself refuses to change or remove one.
CREATE FUNCTION tg_refuse_change() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only';
END;
$$;
CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION tg_refuse_change();

CREATE TABLE idempotency (
    idempotency_key TEXT PRIMARY KEY,
    operation       TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    result          TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX idempotency_created ON idempotency (created_at);
