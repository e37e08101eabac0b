-- Authorize: set credits aside for a hold. ARGV: now, retain_ms, fingerprint, hold_id, feature,
-- cost, expires_at, actor, price_version, price_rule, quantity, rate ('' for an explicit cost).
-- Returns {'ok'|'replay', "draws|overdraft|expires_at"}, {'insufficient', available, shortfall},
-- {'rate_limited', feature, retry_after_ms}, {'hold_exists'} or {'conflict'}.
local fingerprint, hold_id, feature = ARGV[3], ARGV[4], ARGV[5]
local cost, expires = tonumber(ARGV[6]), tonumber(ARGV[7])
local actor, price_version, price_rule = ARGV[8], ARGV[9], ARGV[10]
local quantity, rate = ARGV[11], ARGV[12]

local replay = idem_check(fingerprint)
if replay then return replay end
local acct = load_account(feature)
sweep(NOW, acct)
if redis.call('HEXISTS', K_HOLDS, hold_id) == 1 then return { 'hold_exists' } end
local b = bucket(acct, NOW)
local limited = bucket_refusal(b, feature, cost)
if limited then return limited end
local od_limit, od_used = acct.od_limit, acct.od_used
local draws, overdraft, available = plan(feature, NOW, cost, od_limit - od_used)
if not draws then return { 'insufficient', fmt(available), fmt(cost - available) } end

apply_draws(draws, -1)
if overdraft > 0 then redis.call('HINCRBY', K_ACCT, 'od_used', fmt(overdraft)) end
bucket_take(b, feature, cost)
local hold = {
  status = 'pending', expires = expires, created = NOW, feature = feature, amount = cost,
  overdraft = overdraft, draws = draws, price_version = price_version, price_rule = price_rule, actor = actor,
  quantity = quantity, rate = rate,
}
redis.call('HSET', K_HOLDS, hold_id, encode_hold(hold))
redis.call('ZADD', K_HOLDDUE, fmt(expires), hold_id)
due_at(acct, expires)
local result = table.concat({ encode_draws(draws), fmt(overdraft), fmt(expires) }, '|')
idem_store(fingerprint, result)
return { 'ok', result }
