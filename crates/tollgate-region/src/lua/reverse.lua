-- Reverse: undo a debit, found by its idempotency key, within a window after it was made.
-- ARGV: now, retain_ms, fingerprint, account, the debit's key, window_ms, the Redis key holding
-- the debit's idempotency record (same slot). K_IDEM is this reversal's own key: a reversal is
-- idempotent too. Returns {'ok'|'replay', "amount|usage_id"}, {'unknown_debit'},
-- {'window_closed'}, {'already_reversed'} or {'conflict'}.
local fingerprint, account, debit_key, window = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])

local replay = idem_check(fingerprint)
if replay then return replay end
sweep(NOW, load_account(false))
local debit_idem = ARGV[7]
local stored = redis.call('GET', debit_idem)
if not stored then return { 'unknown_debit' } end
local at = string.find(stored, '\n', 1, true)
-- The debit's fingerprint is "debit|feature|…"; its result ends with the price it was made at
-- (fields 8 to 12: cost, price_version, price_rule, quantity, rate). A result stored before
-- prices were kept with it has none, and its fingerprint was "debit|feature|cost|price_version|
-- price_rule".
local request = split(string.sub(stored, 1, at - 1), '|')
if request[1] ~= 'debit' then return { 'unknown_debit' } end
local result = split(string.sub(stored, at + 1), '|')
local price_version, price_rule, quantity, rate = request[4], request[5], '', ''
if #result >= 12 then
  price_version, price_rule, quantity, rate = result[9], result[10], result[11], result[12]
end
local draws, overdraft, debit_at = decode_draws(result[1]), tonumber(result[2]), tonumber(result[5])
local marker = debit_idem .. ':reversed'
if redis.call('EXISTS', marker) == 1 then return { 'already_reversed' } end
if NOW - debit_at > window then return { 'window_closed' } end

give_back(draws, overdraft)
local amount = overdraft
for _, d in ipairs(draws) do amount = amount + d.amount end
redis.call('SET', marker, '1', 'PX', fmt(RETAIN_MS))
local od_limit, od_used = account_overdraft()
local id = redis.call('XADD', K_STREAM, '*',
  'kind', 'reverse', 'account', account, 'key', debit_key, 'feature', request[2], 'at', fmt(NOW),
  'cost', fmt(amount), 'draws', result[1], 'overdraft', fmt(overdraft), 'pool', fmt(pool_level()),
  'od_room', fmt(od_limit - od_used), 'actor', '',
  'price_version', price_version, 'price_rule', price_rule, 'quantity', quantity, 'rate', rate,
  'hold', '', 'lease', '', 'seq', next_usage_seq())
local reply = fmt(amount) .. '|' .. id
idem_store(fingerprint, reply)
return { 'ok', reply }
