-- The account as this region sees it (after settling what has come due). ARGV: now, retain_ms.
-- Returns {od_limit, od_used, held, holds_pending, leased, leases, usage_seq, held_grants, moves,
-- segment...} with held_grants the grants pending holds draw from, comma-separated, and
-- segments as "id/remaining/priority/expires_at/effective_at/scope".
local acct = load_account(false)
sweep(NOW, acct)
local od_limit, od_used = acct.od_limit, acct.od_used
local held, pending = 0, 0
local held_grants, held_list = {}, {}
local flat = redis.call('HGETALL', K_HOLDS)
for i = 1, #flat, 2 do
  local hold = parse_hold(flat[i + 1])
  if hold.status == 'pending' then
    held = held + hold.amount; pending = pending + 1
    for _, d in ipairs(hold.draws) do
      if d.amount > 0 and not held_grants[d.id] then
        held_grants[d.id] = true
        held_list[#held_list + 1] = d.id
      end
    end
  end
end
table.sort(held_list)
local leased, leases = 0, 0
flat = redis.call('HGETALL', K_LEASES)
for i = 1, #flat, 2 do
  local lease = parse_lease(flat[i + 1])
  leases = leases + 1
  leased = leased + lease.overdraft
  for _, s in ipairs(lease.slices) do leased = leased + s.amount end
end
local useq = redis.call('HGET', K_ACCT, 'useq') or '0'
local out = { fmt(od_limit), fmt(od_used), fmt(held), fmt(pending), fmt(leased), fmt(leases), useq,
  table.concat(held_list, ','), acct.moves }
for _, seg in ipairs(load_segments()) do
  local expires_text = (seg.expires and fmt(seg.expires)) or ''
  out[#out + 1] = table.concat({ seg.id, fmt(seg.remaining), fmt(seg.priority), expires_text, fmt(seg.effective), seg.scope_text }, '/')
end
return out
