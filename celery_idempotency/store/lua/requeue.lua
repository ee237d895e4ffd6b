-- requeue: started -> pending for the same task id, only for the current owner
-- (the task raised Retry, or the claim is given up so that a requeued message can run at once).
-- The pending record gets a deadline: should its message never come, the next publish after
-- the deadline runs the task.
-- KEYS: record
-- ARGV: owner, ttl_ms ('' = keep the TTL),
--       pending_ms: how long the message may take to come back (pending timeout + countdown)
-- Returns 1 if requeued (or already requeued by us), 0 otherwise
local rec = KEYS[1]
local owner, ttl_ms, pending_ms = ARGV[1], ARGV[2], ARGV[3]

if redis.call('HGET', rec, 'o') ~= owner then return 0 end
local state = redis.call('HGET', rec, 'st')
if state == PENDING then return 1 end  -- our own write, retried
if state ~= STARTED then return 0 end
local now = now_ms()
redis.call('HDEL', rec, 'l')
redis.call('HSET', rec, 'st', PENDING, 'u', now, 'pd', now + tonumber(pending_ms))
if ttl_ms ~= '' then
  redis.call('PEXPIRE', rec, math.max(tonumber(ttl_ms), tonumber(pending_ms)))
else
  expire_at_least(rec, pending_ms)
end
return 1
