-- Capture: take up to the held amount, give the rest back, record the debit. ARGV: now,
-- retain_ms, fingerprint, account, key, hold_id, amount ('' for all of it).
-- Returns {'ok'|'replay', "draws|overdraft|released|usage_id"}, {'unknown_hold'},
-- {'captured'|'released'|'expired'} (the hold's state), {'exceeds', held} or {'conflict'}.
local fingerprint, account, key, hold_id = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local amount = tonumber(ARGV[7])

local replay = idem_check(fingerprint)
if replay then return replay end
local acct = load_account(false)
sweep(NOW, acct)
local text = redis.call('HGET', K_HOLDS, hold_id)
if not text then return { 'unknown_hold' } end
local hold = parse_hold(text)
if hold.status ~= 'pending' then return { hold.status } end
if NOW >= hold.expires then
  give_back(hold.draws, hold.overdraft)
  end_hold_scheduled(acct, hold_id, hold, 'expired', NOW)
  return { 'expired' }
end
if amount == nil then amount = hold.amount end
if amount > hold.amount then return { 'exceeds', fmt(hold.amount) } end

-- Draws are kept in burn-down order and overdraft last, so the part given back comes off the
-- overdraft first.
local left = amount
local taken, rest = {}, {}
for _, d in ipairs(hold.draws) do
  local take = math.min(left, d.amount)
  left = left - take
  if take > 0 then taken[#taken + 1] = { id = d.id, amount = take } end
  if d.amount - take > 0 then rest[#rest + 1] = { id = d.id, amount = d.amount - take } end
end
local od_taken = math.min(left, hold.overdraft)
give_back(rest, hold.overdraft - od_taken)
end_hold_scheduled(acct, hold_id, hold, 'captured', NOW)

local od_limit, od_used = account_overdraft()
local encoded = encode_draws(taken)
-- Less than the hold taken is not a whole number of the authorized units: only the rate stays.
local quantity = hold.quantity
if amount ~= hold.amount then quantity = '' end
local id = redis.call('XADD', K_STREAM, '*',
  'kind', 'capture', 'account', account, 'key', key, 'feature', hold.feature, 'at', fmt(hold.created),
  'cost', fmt(amount), 'draws', encoded, 'overdraft', fmt(od_taken), 'pool', fmt(pool_level()),
  'od_room', fmt(od_limit - od_used), 'actor', hold.actor,
  'price_version', hold.price_version, 'price_rule', hold.price_rule, 'quantity', quantity,
  'rate', hold.rate, 'hold', hold_id, 'lease', '', 'seq', next_usage_seq())
local result = table.concat({ encoded, fmt(od_taken), fmt(hold.amount - amount), id }, '|')
idem_store(fingerprint, result)
return { 'ok', result }
