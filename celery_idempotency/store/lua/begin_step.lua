-- begin_step: before a step runs. Check that the claim is still ours (owner and fence) and its
-- lease alive, renew the lease, and return the step's recorded value if there is one.
-- KEYS: record
-- ARGV: owner, fence, field (the step's field: records.step_field), lease_ms
-- Returns {'ok'} | {'ok', value} | {'lost', <record fields>...}
local rec = KEYS[1]
local owner, fence, field, lease_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local now = now_ms()
local f = redis.call('HMGET', rec, 'o', 'st', 'f', 'l')
local held_by, state, held_fence, lease = f[1], f[2], f[3], f[4]
if held_by ~= owner or state ~= STARTED or held_fence ~= fence then return reply('lost', rec) end
-- Expired: another worker may take the key over at any moment; the step must not start.
if not (lease and tonumber(lease) > now) then return reply('lost', rec) end
redis.call('HSET', rec, 'l', now + lease_ms)
expire_at_least(rec, lease_ms)
local value = redis.call('HGET', rec, field)
if value then return {'ok', value} end
return {'ok'}
