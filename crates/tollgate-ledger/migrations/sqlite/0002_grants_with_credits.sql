-- What every mutation and every allocation reads: the account's open grants that still hold
-- credits. Grants spent to zero stay open (a refund may give credits back to them) but are
-- loaded only when a debit names them, so an account's work does not grow with its history.
CREATE INDEX grants_with_credits ON grants (account_id) WHERE state = 'open' AND remaining > 0;
