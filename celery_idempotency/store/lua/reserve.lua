-- reserve: publish time. Create a pending record, or report the one that exists.
-- KEYS: record
-- ARGV: task_id, fingerprint, key, scope, task_name,
--       ttl_ms (idempotency_ttl + countdown),
--       pending_ms: how long the message may take to reach a worker
--         (idempotency_pending_timeout + countdown); a reservation still pending after that
--         is taken to have lost its message (a broker can lose one: a worker killed between
--         taking it and recording it as unacked) and is reserved anew for this publish
-- Returns {'reserved'} | {'reserved', replaced_task_id}
--       | {'duplicate'|'stale'|'mismatch', <record fields>...}
local rec = KEYS[1]
local task_id, fingerprint, key, scope, task_name = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl_ms, pending_ms = tonumber(ARGV[6]), tonumber(ARGV[7])

local now = now_ms()
local fence = '0'
local f = redis.call('HMGET', rec, 'st', 'fp', 't', 'l', 'ry', 'f', 'pd')
local state, fp, held_task_id, lease, retryable, held_fence, deadline =
  f[1], f[2], f[3], f[4], f[5], f[6], f[7]
if state then
  if fp ~= fingerprint then return reply('mismatch', rec) end
  -- Our own reservation, answered but the reply lost and the call retried.
  if state == PENDING and held_task_id == task_id then return {'reserved'} end
  if state == PENDING and deadline and tonumber(deadline) <= now then
    -- Never claimed in time: publish again. Should the first message still arrive, the first
    -- executor claims the key and the other replays its outcome.
    redis.call('HSET', rec, 't', task_id, 'pd', now + pending_ms, 'u', now)
    expire_at_least(rec, math.max(ttl_ms, pending_ms))
    return {'reserved', held_task_id}
  end
  if state == STARTED and not (lease and tonumber(lease) > now) then
    return reply('stale', rec)
  end
  if not (state == FAILED and retryable == '1') then return reply('duplicate', rec) end
  -- A retryable failure: the next publish runs the task again. Keep the fencing counter
  -- monotonic across the new reservation, and the recorded steps: the new run continues
  -- where the failed one stopped.
  fence = held_fence or '0'
  delete_own_fields(rec)
end
redis.call('HSET', rec, 'k', key, 's', scope, 'st', PENDING, 't', task_id,
  'fp', fingerprint, 'f', fence, 'c', now, 'u', now, 'pd', now + pending_ms)
-- The task name is kept only when it is not the scope (the default): bytes per record.
if task_name ~= scope then redis.call('HSET', rec, 'n', task_name) end
-- The reservation outlives its pending deadline whatever the TTL.
redis.call('PEXPIRE', rec, math.max(ttl_ms, pending_ms))
return {'reserved'}
