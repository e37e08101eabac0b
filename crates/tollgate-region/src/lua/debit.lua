-- Debit: one atomic decision. ARGV: now, retain_ms, fingerprint, account, key, feature, cost,
-- actor, price_version, price_rule, forced ('1': a decision already served, recorded whatever
-- the account holds: the segments pay what they can, the rest is overdraft beyond the room if
-- need be, and the feature's bucket neither refuses nor counts it), quantity and rate ('' for an
-- explicit cost).
-- Returns {'ok'|'replay', "draws|overdraft|pool|usage_id|at|od_room||cost|price_version|
-- price_rule|quantity|rate", moves} (pool: active segments after the debit; od_room: overdraft
-- room left; the seventh field is a lease's id, empty here, and the last five are the price the
-- decision was made at; moves, not stored with the key: the account's move count, see lib.lua),
-- {'insufficient', available, shortfall}, {'rate_limited', feature, retry_after_ms} or
-- {'conflict'}.
local fingerprint, account, key, feature = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local cost = tonumber(ARGV[7])
local actor, price_version, price_rule = ARGV[8], ARGV[9], ARGV[10]
local forced = ARGV[11] == '1'
local quantity, rate = ARGV[12], ARGV[13]

local replay = idem_check(fingerprint)
if replay then return replay end
local acct = load_account(feature)
sweep(NOW, acct)
local b = bucket(acct, NOW)
if not forced then
  local limited = bucket_refusal(b, feature, cost)
  if limited then return limited end
end
local od_limit, od_used = acct.od_limit, acct.od_used
local room = od_limit - od_used
if forced then room = math.max(room, 0) + cost end
local draws, overdraft, pool_or_available = plan(feature, NOW, cost, room)
if not draws then return { 'insufficient', fmt(pool_or_available), fmt(cost - pool_or_available) } end
local pool = pool_or_available

apply_draws(draws, -1)
if overdraft > 0 then redis.call('HINCRBY', K_ACCT, 'od_used', fmt(overdraft)) end
if not forced then bucket_take(b, feature, cost) end
local od_room = math.max(od_limit - od_used - overdraft, 0)
local encoded = encode_draws(draws)
local id = redis.call('XADD', K_STREAM, '*',
  'kind', 'debit', 'account', account, 'key', key, 'feature', feature, 'at', fmt(NOW),
  'cost', fmt(cost), 'draws', encoded, 'overdraft', fmt(overdraft), 'pool', fmt(pool),
  'od_room', fmt(od_room), 'actor', actor,
  'price_version', price_version, 'price_rule', price_rule, 'quantity', quantity, 'rate', rate,
  'hold', '', 'lease', '', 'seq', next_usage_seq())
local result = table.concat({ encoded, fmt(overdraft), fmt(pool), id, fmt(NOW),
  fmt(od_room), '', fmt(cost), price_version, price_rule, quantity, rate }, '|')
idem_store(fingerprint, result)
return { 'ok', result, acct.moves }
