-- The entries of one debit or one grant, in sequence order, through one index. With only
-- (account_id, debit_id) the planner chose the primary key for the ORDER BY seq and filtered
-- the account's whole history row by row: a lookup of one debit's entries (explain, the
-- reconciler's and the simulation's checks) grew with the account's age (30 ms at 34,000
-- entries on SQLite). With seq last in the index, the equality and the order are both served.
CREATE INDEX ledger_entries_debit_seq ON ledger_entries (account_id, debit_id, seq)
    WHERE debit_id IS NOT NULL;
CREATE INDEX ledger_entries_grant_seq ON ledger_entries (account_id, grant_id, seq)
    WHERE grant_id IS NOT NULL;
DROP INDEX ledger_entries_debit;
DROP INDEX ledger_entries_grant;
