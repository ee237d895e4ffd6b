-- claim: execution time. Take the key (started, owner token, lease, new fence) or say why not.
-- KEYS[1] record
-- ARGV[1] task_id  ARGV[2] owner  ARGV[3] fingerprint  ARGV[4] key  ARGV[5] scope
-- ARGV[6] task_name  ARGV[7] lease_ms  ARGV[8] ttl_ms
-- returns {'claimed', fence, previous_task_id} | {'taken_over', fence, previous_task_id}
--       | {'busy'|'succeeded'|'failed'|'mismatch', <record fields>...}
local rec = KEYS[1]
local now, now_us = clock()
-- One read of every field the decision needs (a missing field reads as false).
local f = redis.call('HMGET', rec, 'st', 'fp', 'o', 'l', 't', 'ry', 'f')
local state, fp, owner, lease, task_id, retryable, fence = f[1], f[2], f[3], f[4], f[5], f[6], f[7]

local function take(status)
  -- Fencing: above the record's last fence, and never below the server clock in µs, so that
  -- it keeps growing after the record is deleted, expires or is evicted (fence 0 again).
  local new_fence = math.max((fence and tonumber(fence) or 0) + 1, now_us)
  local lease_until = now + tonumber(ARGV[7])
  if state then
    -- A claim starts clean: no outcome, no deadline of the state it leaves.
    redis.call('HDEL', rec, 'r', 'ct', 'ce', 'rs', 'e', 'ry', 'pd')
    redis.call('HSET', rec, 'st', 'started', 't', ARGV[1], 'o', ARGV[2],
      'l', lease_until, 'u', now, 'f', int(new_fence))
  else
    -- Never reserved (sent by name with a key header) or expired: execution-time dedup.
    redis.call('HSET', rec, 'k', ARGV[4], 's', ARGV[5], 'fp', ARGV[3], 'c', now,
      'st', 'started', 't', ARGV[1], 'o', ARGV[2], 'l', lease_until, 'u', now,
      'f', int(new_fence))
    -- The task name is kept only when it is not the scope (the default): bytes per record.
    if ARGV[6] ~= ARGV[5] then redis.call('HSET', rec, 'n', ARGV[6]) end
  end
  -- The record outlives the lease whatever the TTL (renew keeps it so).
  redis.call('PEXPIRE', rec, math.max(tonumber(ARGV[8]), tonumber(ARGV[7])))
  return {status, new_fence, task_id or ''}
end

if not state then return take('claimed') end
if fp ~= ARGV[3] then return reply('mismatch', rec) end
if state == 'pending' then return take('claimed') end
if state == 'started' then
  -- Our own claim, answered but the reply lost and the call retried: the same fence, and
  -- the lease counts from now, as if this were the first answer (the owner is alive).
  if owner == ARGV[2] then
    redis.call('HSET', rec, 'l', now + tonumber(ARGV[7]))
    redis.call('PEXPIRE', rec, math.max(tonumber(ARGV[8]), tonumber(ARGV[7])))
    return {'claimed', tonumber(fence), task_id}
  end
  if lease and tonumber(lease) > now then return reply('busy', rec) end
  return take('taken_over')
end
if state == 'succeeded' then return reply('succeeded', rec) end
-- failed: a retryable failure is run again by a new message, replayed to its own redelivery.
if retryable == '1' and task_id ~= ARGV[1] then return take('claimed') end
return reply('failed', rec)
