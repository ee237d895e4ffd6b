-- claim: execution time. Take the key (started, owner token, lease, new fence) or say why not.
-- KEYS: record
-- ARGV: task_id, owner, fingerprint, key, scope, task_name, lease_ms, ttl_ms,
--       park: '' or what it takes to publish this message again (JSON): when busy, it is
--         parked as field w:<task_id>, for the owner's final write to hand back (complete.lua),
--       unpark: '1' for a message that parked before (this copy, or another copy of the same
--         task id). Whichever copy gets past 'busy' first removes the field w:<task_id>; a copy
--         with unpark that finds an outcome and no field answers 'handled' (another copy
--         replayed it, or ran the task)
-- Returns {'claimed', fence, previous_task_id} | {'taken_over', fence, previous_task_id}
--       | {'busy'|'parked', lease_remaining_ms, <record fields>...} ('parked': busy, and parked)
--       | {'succeeded'|'failed'|'mismatch', <record fields>...} | {'handled'}
local rec = KEYS[1]
local task_id, owner, fingerprint = ARGV[1], ARGV[2], ARGV[3]
local key, scope, task_name = ARGV[4], ARGV[5], ARGV[6]
local lease_ms, ttl_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
local park, unpark = ARGV[9], ARGV[10]
local parked_as = PARK_PREFIX .. task_id

local now, now_us = clock()
-- One read of every field the decision needs (a missing field reads as false).
local f = redis.call('HMGET', rec, 'st', 'fp', 'o', 'l', 't', 'ry', 'f')
local state, fp, held_by, lease, held_task_id, retryable, fence =
  f[1], f[2], f[3], f[4], f[5], f[6], f[7]

local function take(status)
  -- Fencing: above the record's last fence, and never below the server clock in µs, so that
  -- it keeps growing after the record is deleted, expires or is evicted (fence 0 again).
  local new_fence = math.max((fence and tonumber(fence) or 0) + 1, now_us)
  local lease_until = now + lease_ms
  if state then
    -- A claim starts clean: no outcome, no deadline of the state it leaves.
    redis.call('HDEL', rec, 'r', 'ct', 'ce', 'rs', 'e', 'ry', 'pd')
    redis.call('HSET', rec, 'st', STARTED, 't', task_id, 'o', owner,
      'l', lease_until, 'u', now, 'f', int(new_fence))
  else
    -- Never reserved (sent by name with a key header) or expired: execution-time dedup.
    redis.call('HSET', rec, 'k', key, 's', scope, 'fp', fingerprint, 'c', now,
      'st', STARTED, 't', task_id, 'o', owner, 'l', lease_until, 'u', now,
      'f', int(new_fence))
    -- The task name is kept only when it is not the scope (the default): bytes per record.
    if task_name ~= scope then redis.call('HSET', rec, 'n', task_name) end
  end
  -- Running it now: no copy of this message may replay the outcome it will write. (After the
  -- first write: under maxmemory, that one must be refused before anything changes.)
  redis.call('HDEL', rec, parked_as)
  -- The record outlives the lease whatever the TTL (renew keeps it so).
  redis.call('PEXPIRE', rec, math.max(ttl_ms, lease_ms))
  return {status, new_fence, held_task_id or ''}
end

if not state then return take('claimed') end
if fp ~= fingerprint then return reply('mismatch', rec) end
if state == PENDING then return take('claimed') end
if state == STARTED then
  -- Our own claim, answered but the reply lost and the call retried: the same fence, and
  -- the lease counts from now, as if this were the first answer (the owner is alive).
  if held_by == owner then
    redis.call('HSET', rec, 'l', now + lease_ms)
    redis.call('PEXPIRE', rec, math.max(ttl_ms, lease_ms))
    return {'claimed', tonumber(fence), held_task_id}
  end
  -- A live owner: say how long its lease still runs, so that the caller needs no clock. Park
  -- unless the owner is another copy of this very message (it answers for both).
  if lease and tonumber(lease) > now then
    if park ~= '' and held_task_id ~= task_id then
      redis.call('HSET', rec, parked_as, park, EXTRAS, '1')
      return reply('parked', rec, tonumber(lease) - now)
    end
    return reply('busy', rec, tonumber(lease) - now)
  end
  return take('taken_over')
end
-- failed: a retryable failure is run again by a new message, replayed to its own redelivery.
if state == FAILED and retryable == '1' and held_task_id ~= task_id then
  return take('claimed')
end
-- A final outcome: of the copies of a parked message, the one that removes its field replays it.
if redis.call('HDEL', rec, parked_as) == 0 and unpark == '1' then return {'handled'} end
if state == SUCCEEDED then return reply('succeeded', rec) end
return reply('failed', rec)
