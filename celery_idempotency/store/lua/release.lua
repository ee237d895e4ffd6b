-- release: started -> pending for the same task id, only for the current owner
-- (the task raised Retry, or the claim is given up so that a redelivery can run at once).
-- KEYS[1] record
-- ARGV[1] owner  ARGV[2] ttl_ms ('' = keep the TTL)
-- returns 1 if released (or already released by us), 0 otherwise
local rec = KEYS[1]
if redis.call('HGET', rec, 'o') ~= ARGV[1] then return 0 end
local state = redis.call('HGET', rec, 'st')
if state == 'pending' then return 1 end  -- our own write, retried
if state ~= 'started' then return 0 end
redis.call('HDEL', rec, 'l')
redis.call('HSET', rec, 'st', 'pending', 'u', now_ms())
if ARGV[2] ~= '' then redis.call('PEXPIRE', rec, ARGV[2]) end
return 1
