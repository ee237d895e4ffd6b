-- reserve: publish time. Create a pending record, or report the one that exists.
-- KEYS[1] record
-- ARGV[1] task_id  ARGV[2] fingerprint  ARGV[3] key  ARGV[4] scope  ARGV[5] task_name
-- ARGV[6] ttl_ms (idempotency_ttl + countdown)
-- ARGV[7] pending_ms: how long the message may take to reach a worker
--         (idempotency_pending_timeout + countdown); a reservation still pending after that
--         is taken to have lost its message (a broker can lose one: a worker killed between
--         taking it and recording it as unacked) and is reserved anew for this publish
-- returns {'reserved'} | {'reserved', replaced_task_id}
--       | {'duplicate'|'stale'|'mismatch', <record fields>...}
local rec = KEYS[1]
local now = now_ms()
local fence = '0'
local f = redis.call('HMGET', rec, 'st', 'fp', 't', 'l', 'ry', 'f', 'pd')
local state = f[1]
if state then
  if f[2] ~= ARGV[2] then return reply('mismatch', rec) end
  -- Our own reservation, answered but the reply lost and the call retried.
  if state == 'pending' and f[3] == ARGV[1] then return {'reserved'} end
  if state == 'pending' and f[7] and tonumber(f[7]) <= now then
    -- Never claimed in time: publish again. Should the first message still arrive, the first
    -- executor claims the key and the other replays its outcome.
    redis.call('HSET', rec, 't', ARGV[1], 'pd', now + tonumber(ARGV[7]), 'u', now)
    expire_at_least(rec, math.max(tonumber(ARGV[6]), tonumber(ARGV[7])))
    return {'reserved', f[3]}
  end
  if state == 'started' and not (f[4] and tonumber(f[4]) > now) then
    return reply('stale', rec)
  end
  if not (state == 'failed' and f[5] == '1') then return reply('duplicate', rec) end
  -- A retryable failure: the next publish runs the task again. Keep the fencing counter
  -- monotonic across the new reservation.
  fence = f[6] or '0'
  redis.call('DEL', rec)
end
redis.call('HSET', rec, 'k', ARGV[3], 's', ARGV[4], 'st', 'pending', 't', ARGV[1],
  'fp', ARGV[2], 'f', fence, 'c', now, 'u', now, 'pd', now + tonumber(ARGV[7]))
-- The task name is kept only when it is not the scope (the default): bytes per record.
if ARGV[5] ~= ARGV[4] then redis.call('HSET', rec, 'n', ARGV[5]) end
-- The reservation outlives its pending deadline whatever the TTL.
redis.call('PEXPIRE', rec, math.max(tonumber(ARGV[6]), tonumber(ARGV[7])))
return {'reserved'}
