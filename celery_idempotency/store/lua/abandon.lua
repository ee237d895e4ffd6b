-- abandon: the worker's main process gives up the claim of a task that ended without running
-- to completion: its pool child died (SIGKILL, OOM, os._exit), or it was revoked/terminated.
-- The owner token is unknown to the main process, so the claim is matched by task id and by
-- the owner prefix that names the dead child (host hash + pid); a pending record (the task
-- never started) is matched by task id alone.
-- KEYS[1] record
-- ARGV[1] task_id  ARGV[2] owner prefix ('' = only a pending record)
-- ARGV[3] 'pending' (the message was requeued: let the redelivery run at once)
--         or 'failed' (the message is gone: fail retryable, so that the next publish runs)
-- ARGV[4] error (JSON, for 'failed')  ARGV[5] ttl_ms (for 'failed')
-- ARGV[6] pending_ms (for 'pending'): the requeued message has until then to come back
-- returns 1 if changed, 0 otherwise
local rec = KEYS[1]
if redis.call('HGET', rec, 't') ~= ARGV[1] then return 0 end
local state = redis.call('HGET', rec, 'st')
if state == 'started' then
  local owner = redis.call('HGET', rec, 'o') or ''
  if ARGV[2] == '' or string.sub(owner, 1, #ARGV[2]) ~= ARGV[2] then return 0 end
elseif state ~= 'pending' then
  return 0
end
local now = now_ms()
redis.call('HDEL', rec, 'l', 'pd')
if ARGV[3] == 'pending' then
  redis.call('HSET', rec, 'st', 'pending', 'u', now, 'pd', now + tonumber(ARGV[6]))
  expire_at_least(rec, ARGV[6])
else
  redis.call('HSET', rec, 'st', 'failed', 'e', ARGV[4], 'ry', '1', 'u', now)
  redis.call('PEXPIRE', rec, ARGV[5])
end
return 1
