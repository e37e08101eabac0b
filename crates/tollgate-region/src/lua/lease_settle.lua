-- Settle usage an edge node decided from its lease. ARGV: now, retain_ms, account, lease_id,
-- lease_expires_at, idempotency key prefix, then per entry 12 values: key, fingerprint, feature,
-- at, cost, draws, overdraft, actor, price_version, price_rule, quantity, rate ('' for an
-- explicit cost). An entry's key is remembered like a strict debit's, with the same fingerprint
-- and result (the lease id as its seventh field), so either mode sees the other's keys.
-- Returns one status per entry, or {'no_lease'} when the lease is gone:
--   "ok:usage_id"                 charged now, or charged by an earlier call of this very
--                                 decision whose reply was lost (the usage id is the first one);
--   "rekeyed:usage_id:derived"    the key was remembered for a different request: charged
--                                 under a key derived from it (see derived_key);
--   "duplicate"                   the same request was charged already (by this or another edge,
--                                 or earlier in this call): the edge credits it back to its lease;
--   "rejected:reason"             the entry does not fit the lease; nothing is charged.
local account, lease_id, expires, prefix = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local ENTRY_FIELDS = 12
-- IDEMPOTENCY_KEY_LEN_MAX in tollgate-core, and the hex digits of a derived key's tag.
local KEY_LEN_MAX, TAG_HEX = 128, 16
-- Derived keys tried in turn before an entry is rejected (each is taken only when a client
-- reused the key before it with yet another request, or sent a derived key itself).
local REKEY_DEPTH_MAX = 3

-- The key an entry is charged under when its own key was used for a different request:
-- deterministic, so a resend finds its first charge. The same in memory.rs (`derived_key`).
local function derived_key(key, fingerprint)
  local tag = string.sub(redis.sha1hex(fingerprint .. '\n' .. key), 1, TAG_HEX)
  return string.sub(key, 1, KEY_LEN_MAX - 1 - TAG_HEX) .. '~' .. tag
end

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
-- Idempotency keys written by this call: an entry repeated within one call is decided again,
-- never a resend of an earlier call.
local written = {}

-- What `idem_key` remembers for the entry at ARGV[i]: nil (nothing), 'other' (a different
-- request), 'same' and the usage id (this very decision, committed by an earlier call whose
-- reply was lost) or 'again' (the same request, decided again).
local function remembered_as(idem_key, i)
  local stored = redis.call('GET', idem_key)
  if not stored then return nil end
  local nl = string.find(stored, '\n', 1, true)
  if string.sub(stored, 1, nl - 1) ~= ARGV[i + 1] then return 'other' end
  local r = split(string.sub(stored, nl + 1), '|')
  if not written[idem_key] and r[1] == ARGV[i + 5] and tonumber(r[2]) == tonumber(ARGV[i + 6])
      and tonumber(r[5]) == tonumber(ARGV[i + 3]) and r[7] == lease_id then
    return 'same', r[4]
  end
  return 'again'
end

-- Charges the entry at ARGV[i] under `key`: returns the usage id, or nil and the problem.
local function record(key, i)
  local fingerprint, feature = ARGV[i + 1], ARGV[i + 2]
  local at, cost = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local draws, overdraft = decode_draws(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local total, problem = overdraft, nil
  for _, d in ipairs(draws) do
    total = total + d.amount
    local slice = by_id[d.id]
    if slice == nil or slice.amount < d.amount then problem = 'draw exceeds lease slice ' .. d.id end
  end
  if overdraft > lease.overdraft then problem = 'overdraft exceeds the lease' end
  if total ~= cost then problem = 'draws do not sum to the cost' end
  if problem then return nil, problem end
  for _, d in ipairs(draws) do by_id[d.id].amount = by_id[d.id].amount - d.amount end
  lease.overdraft = lease.overdraft - overdraft
  local id = redis.call('XADD', K_STREAM, '*',
    'kind', 'debit', 'account', account, 'key', key, 'feature', feature, 'at', fmt(at),
    'cost', fmt(cost), 'draws', ARGV[i + 5], 'overdraft', fmt(overdraft), 'pool', fmt(pool),
    'od_room', fmt(od_limit - od_used), 'actor', ARGV[i + 7],
    'price_version', ARGV[i + 8], 'price_rule', ARGV[i + 9], 'quantity', ARGV[i + 10],
    'rate', ARGV[i + 11], 'hold', '', 'lease', lease_id, 'seq', next_usage_seq())
  local result = table.concat({ ARGV[i + 5], fmt(overdraft), fmt(pool), id, fmt(at),
    fmt(od_limit - od_used), lease_id, fmt(cost), ARGV[i + 8], ARGV[i + 9], ARGV[i + 10],
    ARGV[i + 11] }, '|')
  redis.call('SET', prefix .. key, fingerprint .. '\n' .. result, 'PX', fmt(RETAIN_MS))
  written[prefix .. key] = true
  return id
end

-- The status of the entry at ARGV[i]: its own key first, then derived keys in turn.
local function settle(i)
  local key = ARGV[i]
  for _ = 0, REKEY_DEPTH_MAX do
    local seen, id = remembered_as(prefix .. key, i)
    if seen == nil then
      local problem
      id, problem = record(key, i)
      if not id then return 'rejected:' .. problem end
      seen = 'same'
    end
    if seen == 'again' then return 'duplicate' end
    if seen == 'same' then
      if key == ARGV[i] then return 'ok:' .. id end
      return 'rekeyed:' .. id .. ':' .. key
    end
    key = derived_key(key, ARGV[i + 1])
  end
  return 'rejected:idempotency key and its derived keys all used by other requests'
end

local statuses = {}
for i = 7, #ARGV, ENTRY_FIELDS do
  statuses[#statuses + 1] = settle(i)
end
lease.expires = math.max(lease.expires, expires)
redis.call('HSET', K_LEASES, lease_id, encode_lease(lease))
redis.call('ZADD', K_LEASEDUE, fmt(lease.expires), lease_id)
due_at(acct, lease.expires)
return statuses
