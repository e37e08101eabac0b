-- Install or top up an allocation segment. ARGV: now, retain_ms, fingerprint, grant_id, amount,
-- priority, expires_at ('' for none), effective_at, scope ('*' or 'f1,f2'), pool_max.
-- Returns {'ok'|'replay', "remaining|pool"}, {'pool_full', pool} or {'conflict'}.
local fingerprint, grant_id = ARGV[3], ARGV[4]
local amount, pool_max = tonumber(ARGV[5]), tonumber(ARGV[10])

local replay = idem_check(fingerprint)
if replay then return replay end
sweep(NOW, load_account(false))
local pool = pool_level()
if pool + amount > pool_max then return { 'pool_full', fmt(pool) } end
redis.call('HSET', K_SEG, 'm:' .. grant_id, table.concat({ ARGV[6], ARGV[7], ARGV[8], ARGV[9] }, '|'))
if amount > 0 then count_move() end
redis.call('HDEL', K_ACCT, 'z:' .. grant_id)
local remaining = redis.call('HINCRBY', K_SEG, 'r:' .. grant_id, fmt(amount))
local result = fmt(remaining) .. '|' .. fmt(pool + amount)
idem_store(fingerprint, result)
return { 'ok', result }
