-- save_step: record a step's value, only for the current owner under its fence. The lease is
-- not checked: the step did run, and as long as nobody took the key over its value holds.
-- The field lives and expires with the record (same hash, same TTL, same Cluster slot).
-- KEYS: record
-- ARGV: owner, fence, field (the step's field: records.step_field), value
-- Returns {'ok'} | {'lost', <record fields>...}
local rec = KEYS[1]
local owner, fence, field, value = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local f = redis.call('HMGET', rec, 'o', 'st', 'f')
if f[1] ~= owner or f[2] ~= STARTED or f[3] ~= fence then return reply('lost', rec) end
redis.call('HSET', rec, field, value, EXTRAS, '1')
return {'ok'}
