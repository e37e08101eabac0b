-- Shared by every Tollgate region script; prepended to each one when it is loaded.
--
-- KEYS (the same layout for every account script, all under the hash tag {account}):
--   1 segments           HASH m:<grant> -> "priority|expires_at|effective_at|scope"
--                             r:<grant> -> remaining micro-credits
--                             (only segments holding credits: see add_to_segment)
--   2 account            HASH od_limit, od_used, due (earliest time a hold or lease comes due),
--                             useq (how many usage records the account has in the stream),
--                             l:<feature> -> "amount|period_ms|burst", b:<feature> -> "tokens|last_ms",
--                             z:<grant> -> the terms of a segment spent to zero
--   3 holds              HASH hold_id -> "status|expires_at|created_at|feature|amount|overdraft|draws|price_version|price_rule|actor"
--   4 hold schedule      ZSET hold_id by the time it is due (pending: expiry; ended: forgetting)
--   5 leases             HASH lease_id -> "expires_at|overdraft|slices"
--   6 lease expiry       ZSET lease_id by expires_at
--   7 usage stream       STREAM of the region
--   8 idempotency key    STRING "fingerprint\nresult" for this call (unused by some scripts)
-- ARGV[1] is now (ms) and ARGV[2] how long idempotency keys and ended holds are remembered (ms).
--
-- Amounts are integers of micro-credits below 2^53, exact in Lua's doubles; they are written
-- back with string.format('%d'), never tostring, which would print 14 significant digits.
-- Every redis.call costs about a microsecond, so each script reads the account in as few
-- calls as it can: one HGETALL for the segments, one HMGET for the account's scalars.

local K_SEG, K_ACCT, K_HOLDS, K_HOLDDUE, K_LEASES, K_LEASEDUE, K_STREAM, K_IDEM =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local NOW = tonumber(ARGV[1])
local RETAIN_MS = tonumber(ARGV[2])
-- Due holds and leases handled per call; the rest wait for the next call on the account.
local SWEEP_MAX = 64

local function fmt(n)
  return string.format('%d', n)
end

local function split(text, sep)
  local parts = {}
  local start = 1
  while true do
    local i = string.find(text, sep, start, true)
    if not i then
      parts[#parts + 1] = string.sub(text, start)
      return parts
    end
    parts[#parts + 1] = string.sub(text, start, i - 1)
    start = i + #sep
  end
end

-- Byte-wise comparison, the order Rust's String uses; Lua's `<` on strings follows the locale.
local function bytes_less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- "id=amount,id=amount" <-> { {id=, amount=}, ... }
local function encode_draws(draws)
  local parts = {}
  for i, d in ipairs(draws) do parts[i] = d.id .. '=' .. fmt(d.amount) end
  return table.concat(parts, ',')
end

local function decode_draws(text)
  local draws = {}
  if text == nil or text == '' then return draws end
  for _, part in ipairs(split(text, ',')) do
    local pair = split(part, '=')
    draws[#draws + 1] = { id = pair[1], amount = tonumber(pair[2]) }
  end
  return draws
end

local function parse_meta(id, text, remaining)
  local priority, expires, effective, scope = string.match(text, '^(%d+)|(%d*)|(%d+)|(.*)$')
  return {
    id = id,
    meta = text,
    remaining = remaining,
    priority = tonumber(priority),
    expires = tonumber(expires),
    effective = tonumber(effective),
    scope_text = scope,
  }
end

-- All segments, from one HGETALL of the segments hash.
local function load_segments()
  local flat = redis.call('HGETALL', K_SEG)
  local rem, meta, order = {}, {}, {}
  for i = 1, #flat, 2 do
    local field = flat[i]
    local kind, id = string.sub(field, 1, 1), string.sub(field, 3)
    if kind == 'r' then
      rem[id] = tonumber(flat[i + 1])
    elseif kind == 'm' then
      meta[id] = flat[i + 1]
      order[#order + 1] = id
    end
  end
  local segments = {}
  for _, id in ipairs(order) do segments[#segments + 1] = parse_meta(id, meta[id], rem[id] or 0) end
  return segments
end

local function active(seg, now)
  return seg.effective <= now and (seg.expires == nil or now < seg.expires)
end

-- A scope is '*' or "f1,f2"; features never contain a comma.
local function covers(seg, feature)
  local scope = seg.scope_text
  return scope == '*' or string.find(',' .. scope .. ',', ',' .. feature .. ',', 1, true) ~= nil
end

-- Burn-down order: priority, then expiry (none last), then effective time, then id.
local function burn_less(a, b)
  if a.priority ~= b.priority then return a.priority < b.priority end
  if a.expires ~= b.expires then
    if a.expires == nil then return false end
    if b.expires == nil then return true end
    return a.expires < b.expires
  end
  if a.effective ~= b.effective then return a.effective < b.effective end
  return bytes_less(a.id, b.id)
end

-- The account's scalars in one read: overdraft limit and use, when something is next due, how
-- many times the authority moved credits or room in or out (`moves`), and (with a feature) that
-- feature's rate limit and bucket.
local function load_account(feature)
  local v
  if feature then
    v = redis.call('HMGET', K_ACCT, 'od_limit', 'od_used', 'due', 'mv', 'l:' .. feature,
      'b:' .. feature)
  else
    v = redis.call('HMGET', K_ACCT, 'od_limit', 'od_used', 'due', 'mv')
  end
  return {
    od_limit = tonumber(v[1] or '0') or 0,
    od_used = tonumber(v[2] or '0') or 0,
    due = tonumber(v[3] or ''),
    moves = v[4] or '0',
    limit = v[5] or false,
    bucket = v[6] or false,
  }
end

-- The authority moved credits or overdraft room into or out of the region: the account's
-- summary published before no longer matches what the region holds (an edge compares the
-- count a decision returns with the one stamped on the summary it read).
local function count_move()
  redis.call('HINCRBY', K_ACCT, 'mv', 1)
end

local function account_overdraft()
  local a = load_account(false)
  return a.od_limit, a.od_used
end

-- Records that something comes due at `at`, so the next call sweeps then and not before.
local function due_at(acct, at)
  if acct.due == nil or at < acct.due then
    acct.due = at
    redis.call('HSET', K_ACCT, 'due', fmt(at))
  end
end

-- Plans `cost` over the segments eligible for `feature` at `now`, then overdraft. Returns
-- draws, overdraft and the pool level after the draws; or nil, nil and what was available.
local function plan(feature, now, cost, overdraft_room)
  local eligible = {}
  local pool = 0
  for _, seg in ipairs(load_segments()) do
    -- The pool counts what can be spent now: segments not yet effective or already ended
    -- hold credits the account cannot use.
    if active(seg, now) then pool = pool + seg.remaining end
    if active(seg, now) and seg.remaining > 0 and covers(seg, feature) then
      eligible[#eligible + 1] = seg
    end
  end
  table.sort(eligible, burn_less)
  local left = cost
  local from_segments = 0
  local draws = {}
  for _, seg in ipairs(eligible) do
    from_segments = from_segments + seg.remaining
    if left > 0 then
      local take = math.min(left, seg.remaining)
      left = left - take
      draws[#draws + 1] = { id = seg.id, amount = take, seg = seg }
    end
  end
  if overdraft_room < 0 then overdraft_room = 0 end
  if left <= overdraft_room then return draws, left, pool - (cost - left) end
  return nil, nil, from_segments + overdraft_room
end

-- Moves a segment's remainder by `delta` and returns it. Every decision reads the whole
-- segments hash, so a segment spent to zero leaves it: its terms move to the account hash
-- (z:<grant>, never read by a decision), and credits given back to it (a hold released, a
-- lease returned, a debit reversed) bring it back. Credits for a grant the region never
-- held are dropped. `meta` is the segment's terms when the caller has them at hand.
local function add_to_segment(id, delta, meta)
  local left = redis.call('HINCRBY', K_SEG, 'r:' .. id, fmt(delta))
  if left == 0 then
    meta = meta or redis.call('HGET', K_SEG, 'm:' .. id)
    redis.call('HDEL', K_SEG, 'm:' .. id, 'r:' .. id)
    if meta then redis.call('HSET', K_ACCT, 'z:' .. id, meta) end
  elseif delta > 0 and left == delta then
    local terms = redis.call('HGET', K_ACCT, 'z:' .. id)
    if terms then
      redis.call('HSET', K_SEG, 'm:' .. id, terms)
      redis.call('HDEL', K_ACCT, 'z:' .. id)
    elseif redis.call('HEXISTS', K_SEG, 'm:' .. id) == 0 then
      redis.call('HDEL', K_SEG, 'r:' .. id)
      left = 0
    end
  end
  return left
end

-- A retired segment's terms (see add_to_segment), or nil.
local function retired_segment(id)
  local terms = redis.call('HGET', K_ACCT, 'z:' .. id)
  if terms then return parse_meta(id, terms, 0) end
  return nil
end

local function apply_draws(draws, sign)
  for _, d in ipairs(draws) do
    if d.amount > 0 then add_to_segment(d.id, sign * d.amount, d.seg and d.seg.meta) end
  end
end

local function pool_level()
  local total = 0
  for _, seg in ipairs(load_segments()) do total = total + seg.remaining end
  return total
end

-- Holds: "status|expires_at|created_at|feature|amount|overdraft|draws|price_version|price_rule|
-- actor|quantity|rate" (a hold placed before quantities were kept ends at the actor).
local function parse_hold(text)
  local f = split(text, '|')
  return {
    status = f[1], expires = tonumber(f[2]), created = tonumber(f[3]), feature = f[4],
    amount = tonumber(f[5]), overdraft = tonumber(f[6]), draws = decode_draws(f[7]),
    price_version = f[8], price_rule = f[9], actor = f[10], quantity = f[11] or '', rate = f[12] or '',
  }
end

local function encode_hold(h)
  return table.concat({ h.status, fmt(h.expires), fmt(h.created), h.feature, fmt(h.amount), fmt(h.overdraft),
    encode_draws(h.draws), h.price_version, h.price_rule, h.actor, h.quantity, h.rate }, '|')
end

-- Gives a hold's or lease's credits back to their segments and to the overdraft room.
local function give_back(draws, overdraft)
  apply_draws(draws, 1)
  if overdraft > 0 then redis.call('HINCRBY', K_ACCT, 'od_used', fmt(-overdraft)) end
end

-- Ends a pending hold: its credits go back, its record is kept RETAIN_MS to answer replays.
local function end_hold(id, hold, status, now)
  hold.status = status
  redis.call('HSET', K_HOLDS, id, encode_hold(hold))
  redis.call('ZADD', K_HOLDDUE, fmt(now + RETAIN_MS), id)
end

-- After end_hold outside a sweep: make sure the forgetting is scheduled.
local function end_hold_scheduled(acct, id, hold, status, now)
  end_hold(id, hold, status, now)
  due_at(acct, now + RETAIN_MS)
end

-- Leases: "expires_at|overdraft|slices", slices as draws.
local function parse_lease(text)
  local f = split(text, '|')
  return { expires = tonumber(f[1]), overdraft = tonumber(f[2]), slices = decode_draws(f[3]) }
end

local function encode_lease(l)
  local kept = {}
  for _, s in ipairs(l.slices) do
    if s.amount > 0 then kept[#kept + 1] = s end
  end
  return table.concat({ fmt(l.expires), fmt(l.overdraft), encode_draws(kept) }, '|')
end

-- Expired holds give their credits back whether or not anyone touches them again: every call
-- on the account first settles what has come due. Ended holds are forgotten after RETAIN_MS.
-- `acct.due` says when the next hold or lease comes due, so most calls skip this entirely.
local function sweep(now, acct)
  if acct.due == nil or now < acct.due then return end
  local due = redis.call('ZRANGEBYSCORE', K_HOLDDUE, '-inf', fmt(now), 'LIMIT', 0, SWEEP_MAX)
  for _, id in ipairs(due) do
    local text = redis.call('HGET', K_HOLDS, id)
    if text then
      local hold = parse_hold(text)
      if hold.status == 'pending' then
        give_back(hold.draws, hold.overdraft)
        end_hold(id, hold, 'expired', hold.expires)
      else
        redis.call('HDEL', K_HOLDS, id)
        redis.call('ZREM', K_HOLDDUE, id)
      end
    else
      redis.call('ZREM', K_HOLDDUE, id)
    end
  end
  due = redis.call('ZRANGEBYSCORE', K_LEASEDUE, '-inf', fmt(now), 'LIMIT', 0, SWEEP_MAX)
  for _, id in ipairs(due) do
    local text = redis.call('HGET', K_LEASES, id)
    if text then
      local lease = parse_lease(text)
      give_back(lease.slices, lease.overdraft)
      redis.call('HDEL', K_LEASES, id)
    end
    redis.call('ZREM', K_LEASEDUE, id)
  end
  -- The next due time is the earlier of the two schedules' first entries.
  local next_due = nil
  for _, key in ipairs({ K_HOLDDUE, K_LEASEDUE }) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      local at = tonumber(first[2])
      if next_due == nil or at < next_due then next_due = at end
    end
  end
  if next_due then
    redis.call('HSET', K_ACCT, 'due', fmt(next_due))
  else
    redis.call('HDEL', K_ACCT, 'due')
  end
  acct.due = next_due
  -- What was given back changed the overdraft use.
  acct.od_used = tonumber(redis.call('HGET', K_ACCT, 'od_used') or '0') or 0
end

-- Idempotency: a replay with the same fingerprint returns the first result; a different
-- request under the same key is a conflict. Returns nil when the key is new.
local function idem_check(fingerprint)
  local stored = redis.call('GET', K_IDEM)
  if not stored then return nil end
  local at = string.find(stored, '\n', 1, true)
  if string.sub(stored, 1, at - 1) ~= fingerprint then return { 'conflict' } end
  return { 'replay', string.sub(stored, at + 1) }
end

local function idem_store(fingerprint, result)
  redis.call('SET', K_IDEM, fingerprint .. '\n' .. result, 'PX', fmt(RETAIN_MS))
end

-- Token buckets: credits that refill. l:<feature> = "amount|period_ms|burst", b:<feature> =
-- "tokens|last_ms", both read by `load_account(feature)`. Refill arithmetic is in doubles, the same
-- formula as the in-memory store; rate limits are not money and are never written to the ledger.
local function bucket(acct, now)
  if not acct.limit then return nil end
  local c = split(acct.limit, '|')
  local b = { amount = tonumber(c[1]), period = tonumber(c[2]), burst = tonumber(c[3]) }
  if acct.bucket then
    local st = split(acct.bucket, '|')
    b.tokens, b.last = tonumber(st[1]), tonumber(st[2])
  else
    b.tokens, b.last = b.burst, now
  end
  if now > b.last then
    local refill = math.floor((now - b.last) * b.amount / b.period)
    if b.tokens + refill >= b.burst then
      b.tokens, b.last = b.burst, now
    elseif refill > 0 then
      b.tokens = b.tokens + refill
      -- Advance only by the time those whole tokens took, so fractions are not lost.
      b.last = b.last + math.floor(refill * b.period / b.amount)
    end
  end
  if b.tokens > b.burst then b.tokens = b.burst end
  return b
end

-- Nil when `cost` fits the bucket, else the refusal: feature and retry-after (-1: never).
local function bucket_refusal(b, feature, cost)
  if b == nil or cost <= b.tokens then return nil end
  local retry = -1
  if cost <= b.burst then
    retry = math.ceil((cost - b.tokens) * b.period / b.amount) - (NOW - b.last)
    if retry < 1 then retry = 1 end
  end
  return { 'rate_limited', feature, fmt(retry) }
end

local function bucket_take(b, feature, cost)
  if b == nil then return end
  redis.call('HSET', K_ACCT, 'b:' .. feature, fmt(b.tokens - cost) .. '|' .. fmt(b.last))
end

-- Numbers the account's next usage record. The authority remembers the highest number it has
-- reconciled, and a take-back refuses while the account has records beyond it (a reversal not
-- reconciled yet gave credits back that the ledger still counts as spent).
local function next_usage_seq()
  return fmt(redis.call('HINCRBY', K_ACCT, 'useq', 1))
end
