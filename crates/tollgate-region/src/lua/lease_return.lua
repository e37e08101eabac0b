-- Return what is left of a lease to the segments. ARGV: now, retain_ms, lease_id.
-- Returns {'ok', returned} ({'ok', '0'} when there was no lease).
local lease_id = ARGV[3]
sweep(NOW, load_account(false))
local text = redis.call('HGET', K_LEASES, lease_id)
if not text then return { 'ok', '0' } end
local lease = parse_lease(text)
local total = lease.overdraft
for _, s in ipairs(lease.slices) do total = total + s.amount end
give_back(lease.slices, lease.overdraft)
redis.call('HDEL', K_LEASES, lease_id)
redis.call('ZREM', K_LEASEDUE, lease_id)
return { 'ok', fmt(total) }
