-- claim: execution time. Take the key (started, owner token, lease, bumped fence) or say why not.
-- KEYS[1] record
-- ARGV[1] task_id  ARGV[2] owner  ARGV[3] fingerprint  ARGV[4] key  ARGV[5] scope
-- ARGV[6] task_name  ARGV[7] lease_ms  ARGV[8] ttl_ms
-- returns {'claimed', fence} | {'taken_over', fence, previous_task_id}
--       | {'busy'|'succeeded'|'failed'|'mismatch', <record fields>...}
local rec = KEYS[1]
local now = now_ms()
local state = redis.call('HGET', rec, 'st')

local function take(status)
  local previous = redis.call('HGET', rec, 't') or ''
  local fence = redis.call('HINCRBY', rec, 'f', 1)
  redis.call('HDEL', rec, 'r', 'ct', 'ce', 'rs', 'e', 'ry')
  redis.call('HSET', rec, 'st', 'started', 't', ARGV[1], 'o', ARGV[2],
    'l', now + tonumber(ARGV[7]), 'u', now)
  redis.call('PEXPIRE', rec, ARGV[8])
  return {status, fence, previous}
end

if not state then
  -- Never reserved (sent by name with a key header) or expired: execution-time dedup.
  redis.call('HSET', rec, 'k', ARGV[4], 's', ARGV[5], 'n', ARGV[6], 'fp', ARGV[3], 'c', now)
  return take('claimed')
end
if redis.call('HGET', rec, 'fp') ~= ARGV[3] then return reply('mismatch', rec) end
if state == 'pending' then return take('claimed') end
if state == 'started' then
  if redis.call('HGET', rec, 'o') == ARGV[2] then
    -- Our own claim, answered but the reply lost and the call retried.
    return {'claimed', tonumber(redis.call('HGET', rec, 'f'))}
  end
  if lease_alive(rec, now) then return reply('busy', rec) end
  return take('taken_over')
end
if state == 'succeeded' then return reply('succeeded', rec) end
-- failed: a retryable failure is run again by a new message, replayed to its own redelivery.
if redis.call('HGET', rec, 'ry') == '1' and redis.call('HGET', rec, 't') ~= ARGV[1] then
  return take('claimed')
end
return reply('failed', rec)
