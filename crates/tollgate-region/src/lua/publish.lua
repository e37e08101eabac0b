-- Publish a document (price book or account summary) and its change notice in one step.
-- KEYS[1]: the document; KEYS[2]: its generation counter ('' for none); for an account summary,
-- KEYS[3]: the account's scalars and KEYS[4]: where the summary's stamp goes (the account's move
-- count as the summary is published, which the summary's figures match).
-- ARGV: the document, the notice channel, the notice. Returns the new generation (0 for none).
redis.call('SET', KEYS[1], ARGV[1])
local generation = 0
if KEYS[2] ~= nil and KEYS[2] ~= '' then generation = redis.call('INCR', KEYS[2]) end
if KEYS[3] ~= nil and KEYS[3] ~= '' then
  redis.call('SET', KEYS[4], redis.call('HGET', KEYS[3], 'mv') or '0')
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return generation
