-- What a usage debit was priced with: the quantity of units, the unit's name and the credits
-- per unit, as canonical decimal text ("2", "0.0000015") so they read back exactly as they were
-- hashed. NULL when the caller named the cost, for rows written before this migration, and on
-- every entry that is not a usage debit. Entries with all three NULL hash as they always did
-- (see `chain.rs`), so ledgers written before this migration still verify.
ALTER TABLE ledger_entries ADD COLUMN quantity TEXT;
ALTER TABLE ledger_entries ADD COLUMN unit TEXT;
ALTER TABLE ledger_entries ADD COLUMN rate TEXT;
ALTER TABLE debits ADD COLUMN quantity TEXT;
ALTER TABLE debits ADD COLUMN unit TEXT;
ALTER TABLE debits ADD COLUMN rate TEXT;
