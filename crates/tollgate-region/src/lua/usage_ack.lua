-- Acknowledge usage records the caller has made durable, and drop them from the stream.
-- KEYS[1]: the usage stream. ARGV: group, then record ids. Returns the number acknowledged.
local group = ARGV[1]
local acked = 0
for i = 2, #ARGV do
  acked = acked + redis.call('XACK', KEYS[1], group, ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return acked
