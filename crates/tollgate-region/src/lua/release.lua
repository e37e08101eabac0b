-- Release: give a pending hold's credits back. ARGV: now, retain_ms, fingerprint, hold_id.
-- Returns {'ok'|'replay', "released"}, {'unknown_hold'}, {'captured'|'released'|'expired'} or {'conflict'}.
local fingerprint, hold_id = ARGV[3], ARGV[4]

local replay = idem_check(fingerprint)
if replay then return replay end
local acct = load_account(false)
sweep(NOW, acct)
local text = redis.call('HGET', K_HOLDS, hold_id)
if not text then return { 'unknown_hold' } end
local hold = parse_hold(text)
if hold.status ~= 'pending' then return { hold.status } end
give_back(hold.draws, hold.overdraft)
if NOW >= hold.expires then
  end_hold_scheduled(acct, hold_id, hold, 'expired', NOW)
  return { 'expired' }
end
end_hold_scheduled(acct, hold_id, hold, 'released', NOW)
local result = fmt(hold.amount)
idem_store(fingerprint, result)
return { 'ok', result }
