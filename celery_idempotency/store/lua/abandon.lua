-- abandon: the worker's main process gives up the claim of a task that ended without running
-- to completion: its pool child died (SIGKILL, OOM, os._exit), or it was revoked/terminated.
-- The owner token is unknown to the main process, so the claim is matched by task id and by
-- the owner prefix that names the dead child (host hash + pid); a pending record (the task
-- never started) is matched by task id alone.
-- KEYS: record
-- ARGV: task_id, owner_prefix ('' = only a pending record),
--       to_state: PENDING's letter (the message was requeued: let the redelivery run at once)
--         or FAILED's (the message is gone: fail retryable, so that the next publish runs),
--       error (JSON, for failed), ttl_ms (for failed),
--       pending_ms (for pending): the requeued message has until then to come back
-- Returns 1 if changed, 0 otherwise
local rec = KEYS[1]
local task_id, owner_prefix, to_state = ARGV[1], ARGV[2], ARGV[3]
local error_json, ttl_ms, pending_ms = ARGV[4], ARGV[5], ARGV[6]

if redis.call('HGET', rec, 't') ~= task_id then return 0 end
local state = redis.call('HGET', rec, 'st')
if state == STARTED then
  local held_by = redis.call('HGET', rec, 'o') or ''
  if owner_prefix == '' or string.sub(held_by, 1, #owner_prefix) ~= owner_prefix then return 0 end
elseif state ~= PENDING then
  return 0
end
local now = now_ms()
redis.call('HDEL', rec, 'l', 'pd')
if to_state == PENDING then
  redis.call('HSET', rec, 'st', PENDING, 'u', now, 'pd', now + tonumber(pending_ms))
  expire_at_least(rec, pending_ms)
else
  redis.call('HSET', rec, 'st', FAILED, 'e', error_json, 'ry', '1', 'u', now)
  redis.call('PEXPIRE', rec, ttl_ms)
end
wake(rec)
return 1
