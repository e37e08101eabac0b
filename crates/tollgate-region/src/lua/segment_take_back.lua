-- Take back up to `amount` of a segment's unspent credits. ARGV: now, retain_ms, fingerprint,
-- grant_id, amount, reconciled (the highest usage number of the account the authority has
-- reconciled, or '' for no condition). With a condition, nothing is taken while the account
-- has usage records beyond it: a reversal there gave credits back to the segment that the
-- ledger still counts as spent, and handing them to another region could let the ledger see
-- the same credits spent twice before it sees the reversal.
-- Returns {'ok'|'replay', "taken|remaining|pool|unreconciled"} or {'conflict'}, where
-- unreconciled is how many records the condition found beyond it.
local fingerprint, grant_id, amount, reconciled = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]

local replay = idem_check(fingerprint)
if replay then return replay end
sweep(NOW, load_account(false))
local remaining = tonumber(redis.call('HGET', K_SEG, 'r:' .. grant_id) or '0')
local unreconciled = 0
if reconciled ~= '' then
  local useq = tonumber(redis.call('HGET', K_ACCT, 'useq') or '0')
  unreconciled = math.max(0, useq - tonumber(reconciled))
end
local taken = 0
if unreconciled == 0 then taken = math.min(remaining, amount) end
if taken > 0 then
  remaining = add_to_segment(grant_id, -taken)
  count_move()
end
local result = table.concat({ fmt(taken), fmt(remaining), fmt(pool_level()), fmt(unreconciled) }, '|')
idem_store(fingerprint, result)
return { 'ok', result }
