-- Take (or top up) an edge node's lease: a slice of the account's segments, whatever their
-- scope (the edge applies scopes itself), then overdraft room. ARGV: now, retain_ms,
-- fingerprint, lease_id, amount, lease_expires_at.
-- Returns {'ok'|'replay', "granted|overdraft|expires_at|slices"} with slices
-- "id/amount/priority/expires_at/effective_at/scope;..." (what the lease holds after the call),
-- or {'conflict'}. A lease may be granted less than asked, down to zero.
local fingerprint, lease_id = ARGV[3], ARGV[4]
local amount, expires = tonumber(ARGV[5]), tonumber(ARGV[6])

local replay = idem_check(fingerprint)
if replay then return replay end
local acct = load_account(false)
sweep(NOW, acct)
local lease = { expires = expires, overdraft = 0, slices = {} }
local text = redis.call('HGET', K_LEASES, lease_id)
if text then lease = parse_lease(text); lease.expires = math.max(lease.expires, expires) end

local od_limit, od_used = acct.od_limit, acct.od_used
local segments = load_segments()
local eligible = {}
for _, seg in ipairs(segments) do
  if active(seg, NOW) and seg.remaining > 0 then eligible[#eligible + 1] = seg end
end
table.sort(eligible, burn_less)
local left = amount
local by_id = {}
for _, s in ipairs(lease.slices) do by_id[s.id] = s end
for _, seg in ipairs(eligible) do
  if left == 0 then break end
  local take = math.min(left, seg.remaining)
  left = left - take
  add_to_segment(seg.id, -take, seg.meta)
  if by_id[seg.id] then
    by_id[seg.id].amount = by_id[seg.id].amount + take
  else
    by_id[seg.id] = { id = seg.id, amount = take }
    lease.slices[#lease.slices + 1] = by_id[seg.id]
  end
end
local room = math.max(od_limit - od_used, 0)
local od_take = math.min(left, room)
if od_take > 0 then redis.call('HINCRBY', K_ACCT, 'od_used', fmt(od_take)) end
lease.overdraft = lease.overdraft + od_take
left = left - od_take

redis.call('HSET', K_LEASES, lease_id, encode_lease(lease))
redis.call('ZADD', K_LEASEDUE, fmt(lease.expires), lease_id)
due_at(acct, lease.expires)
local meta = {}
for _, seg in ipairs(segments) do meta[seg.id] = seg end
local slices = {}
for _, s in ipairs(lease.slices) do
  local m = meta[s.id] or retired_segment(s.id)
  if m and s.amount > 0 then
    local expires_text = (m.expires and fmt(m.expires)) or ''
    slices[#slices + 1] = table.concat({ s.id, fmt(s.amount), fmt(m.priority), expires_text, fmt(m.effective), m.scope_text }, '/')
  end
end
local result = table.concat({ fmt(amount - left), fmt(lease.overdraft), fmt(lease.expires), table.concat(slices, ';') }, '|')
idem_store(fingerprint, result)
return { 'ok', result }
