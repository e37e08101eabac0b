-- Set the region's overdraft allowance for the account and/or one feature's rate limit.
-- ARGV: now, retain_ms, od_limit ('' to leave as is), feature ('' for none),
-- limit ('' to remove, else "amount|period_ms|burst"). Returns {'ok'}.
local od_limit, feature, limit = ARGV[3], ARGV[4], ARGV[5]
local acct = load_account(false)
sweep(NOW, acct)
if od_limit ~= '' and tonumber(od_limit) ~= acct.od_limit then
  redis.call('HSET', K_ACCT, 'od_limit', od_limit)
  count_move()
end
if feature ~= '' then
  if limit == '' then
    redis.call('HDEL', K_ACCT, 'l:' .. feature, 'b:' .. feature)
  else
    redis.call('HSET', K_ACCT, 'l:' .. feature, limit)
  end
end
return { 'ok' }
