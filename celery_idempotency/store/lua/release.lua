-- release: started -> pending for the same task id, only for the current owner
-- (the task raised Retry, or the claim is given up so that a requeued message can run at once).
-- The pending record gets a deadline: should its message never come, the next publish after
-- the deadline runs the task.
-- KEYS[1] record
-- ARGV[1] owner  ARGV[2] ttl_ms ('' = keep the TTL)
-- ARGV[3] pending_ms: how long the message may take to come back (pending timeout + countdown)
-- returns 1 if released (or already released by us), 0 otherwise
local rec = KEYS[1]
if redis.call('HGET', rec, 'o') ~= ARGV[1] then return 0 end
local state = redis.call('HGET', rec, 'st')
if state == 'pending' then return 1 end  -- our own write, retried
if state ~= 'started' then return 0 end
local now = now_ms()
redis.call('HDEL', rec, 'l')
redis.call('HSET', rec, 'st', 'pending', 'u', now, 'pd', now + tonumber(ARGV[3]))
if ARGV[2] ~= '' then
  redis.call('PEXPIRE', rec, math.max(tonumber(ARGV[2]), tonumber(ARGV[3])))
else
  expire_at_least(rec, ARGV[3])
end
return 1
