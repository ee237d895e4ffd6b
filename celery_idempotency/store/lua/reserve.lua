-- reserve: publish time. Create a pending record, or report the one that exists.
-- KEYS[1] record
-- ARGV[1] task_id  ARGV[2] fingerprint  ARGV[3] key  ARGV[4] scope  ARGV[5] task_name
-- ARGV[6] ttl_ms
-- returns {'reserved'} | {'duplicate'|'stale'|'mismatch', <record fields>...}
local rec = KEYS[1]
local now = now_ms()
local fence = '0'
local state = redis.call('HGET', rec, 'st')
if state then
  if redis.call('HGET', rec, 'fp') ~= ARGV[2] then return reply('mismatch', rec) end
  -- Our own reservation, answered but the reply lost and the call retried.
  if state == 'pending' and redis.call('HGET', rec, 't') == ARGV[1] then return {'reserved'} end
  if state == 'started' and not lease_alive(rec, now) then return reply('stale', rec) end
  if not (state == 'failed' and redis.call('HGET', rec, 'ry') == '1') then
    return reply('duplicate', rec)
  end
  -- A retryable failure: the next publish runs the task again. Keep the fencing counter
  -- monotonic across the new reservation.
  fence = redis.call('HGET', rec, 'f') or '0'
  redis.call('DEL', rec)
end
redis.call('HSET', rec, 'k', ARGV[3], 's', ARGV[4], 'n', ARGV[5], 'st', 'pending',
  't', ARGV[1], 'fp', ARGV[2], 'f', fence, 'c', now, 'u', now)
redis.call('PEXPIRE', rec, ARGV[6])
return {'reserved'}
