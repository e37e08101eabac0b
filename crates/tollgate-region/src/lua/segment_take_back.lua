-- Take back up to `amount` of a segment's unspent credits. ARGV: now, retain_ms, fingerprint,
-- grant_id, amount. Returns {'ok'|'replay', "taken|remaining|pool"} or {'conflict'}.
local fingerprint, grant_id, amount = ARGV[3], ARGV[4], tonumber(ARGV[5])

local replay = idem_check(fingerprint)
if replay then return replay end
sweep(NOW, load_account(false))
local remaining = tonumber(redis.call('HGET', K_SEG, 'r:' .. grant_id) or '0')
local taken = math.min(remaining, amount)
if taken > 0 then remaining = redis.call('HINCRBY', K_SEG, 'r:' .. grant_id, fmt(-taken)) end
local result = table.concat({ fmt(taken), fmt(remaining), fmt(pool_level()) }, '|')
idem_store(fingerprint, result)
return { 'ok', result }
