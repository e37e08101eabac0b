-- Settle usage an edge node decided from its lease. ARGV: now, retain_ms, account, lease_id,
-- lease_expires_at, idempotency key prefix, then per entry 10 values: key, fingerprint, feature,
-- at, cost, draws, overdraft, actor, price_version, price_rule. An entry's key is remembered like
-- a strict debit's, with the same fingerprint and result, so either mode sees the other's keys.
-- Returns one status per entry: "ok:usage_id", "duplicate" (already charged: the edge credits
-- it back to its lease) or "rejected:reason"; or {'no_lease'} when the lease is gone.
local account, lease_id, expires, prefix = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local ENTRY_FIELDS = 10

local acct = load_account(false)
sweep(NOW, acct)
local text = redis.call('HGET', K_LEASES, lease_id)
if not text then return { 'no_lease' } end
local lease = parse_lease(text)
local by_id = {}
for _, s in ipairs(lease.slices) do by_id[s.id] = s end
local od_limit, od_used = acct.od_limit, acct.od_used
-- Settling spends leased credits, not the segments', so the pool level is the same throughout.
local pool = pool_level()
local statuses = {}
for i = 7, #ARGV, ENTRY_FIELDS do
  local key, fingerprint, feature = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local at, cost = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local draws, overdraft = decode_draws(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local idem_key = prefix .. key
  if redis.call('EXISTS', idem_key) == 1 then
    statuses[#statuses + 1] = 'duplicate'
  else
    local total, problem = overdraft, nil
    for _, d in ipairs(draws) do
      total = total + d.amount
      local slice = by_id[d.id]
      if slice == nil or slice.amount < d.amount then problem = 'draw exceeds lease slice ' .. d.id end
    end
    if overdraft > lease.overdraft then problem = 'overdraft exceeds the lease' end
    if total ~= cost then problem = 'draws do not sum to the cost' end
    if problem then
      statuses[#statuses + 1] = 'rejected:' .. problem
    else
      for _, d in ipairs(draws) do by_id[d.id].amount = by_id[d.id].amount - d.amount end
      lease.overdraft = lease.overdraft - overdraft
      local id = redis.call('XADD', K_STREAM, '*',
        'kind', 'debit', 'account', account, 'key', key, 'feature', feature, 'at', fmt(at),
        'cost', fmt(cost), 'draws', ARGV[i + 5], 'overdraft', fmt(overdraft), 'pool', fmt(pool),
        'od_room', fmt(od_limit - od_used), 'actor', ARGV[i + 7],
        'price_version', ARGV[i + 8], 'price_rule', ARGV[i + 9], 'hold', '', 'lease', lease_id, 'seq', next_usage_seq())
      local result = table.concat({ ARGV[i + 5], fmt(overdraft), fmt(pool), id, fmt(at),
        fmt(od_limit - od_used) }, '|')
      redis.call('SET', idem_key, fingerprint .. '\n' .. result, 'PX', fmt(RETAIN_MS))
      statuses[#statuses + 1] = 'ok:' .. id
    end
  end
end
lease.expires = math.max(lease.expires, expires)
redis.call('HSET', K_LEASES, lease_id, encode_lease(lease))
redis.call('ZADD', K_LEASEDUE, fmt(lease.expires), lease_id)
due_at(acct, lease.expires)
return statuses
