-- Shared prelude, prepended to every script when it is loaded (Lua has no include).
-- Field names: see celery_idempotency/records.py. The order of each script's ARGV:
-- SCRIPT_ARGS in celery_idempotency/store/redis.py (each script names them at its top).
-- Time is the server's own (TIME): workers with skewed clocks still agree on lease expiry.
-- Redis >= 5 replicates script effects, so calling TIME before writing is safe.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The server clock in ms and in µs (one TIME). µs since the epoch stay below 2^53 until the
-- year 2255, so a Lua number (a double) holds them exactly.
local function clock()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

-- States as a record holds them: one letter each (records.STATE_CODES; the public names are
-- Python's KeyState). Upper case: never mistaken for a field name.
local PENDING, STARTED, SUCCEEDED, FAILED = 'P', 'R', 'D', 'F'

-- A number as the exact decimal integer (tostring would round it to 14 digits).
local function int(n)
  return string.format('%.0f', n)
end

-- Recovery points: each recorded step is a field of the record named this prefix and the
-- step's name (records.F_STEP_PREFIX); no field of the record's own starts with it.
local STEP_PREFIX = 'sp:'
-- Parked duplicates (records.F_PARK_PREFIX): a duplicate message re-sent because of a live
-- owner registers itself as a field named this prefix and its task id, valued what it takes to
-- publish it again (JSON), so that the owner's final write can hand it back at once.
local PARK_PREFIX = 'w:'
-- Set ('1') while the record may hold step fields or parked duplicates (records.F_EXTRAS): a
-- final write reads the whole record only then, not on the hot path of every task.
local EXTRAS = 'x'

local function is_step(name) return string.sub(name, 1, #STEP_PREFIX) == STEP_PREFIX end
local function is_parked(name) return string.sub(name, 1, #PARK_PREFIX) == PARK_PREFIX end
-- One of the record's own fields (records.without_steps): not a step, a parked duplicate or
-- the marker.
local function is_own(name) return not (is_step(name) or is_parked(name) or name == EXTRAS) end


-- {status, [extra,] field, value, field, value, ...}: the status (and one more value, if
-- given) and the whole record in one reply, but for the steps' values (the caller decides
-- from the record; a step's value can be large).
local function reply(status, key, extra)
  local all = redis.call('HGETALL', key)
  local fields = {status}
  if extra ~= nil then table.insert(fields, extra) end
  for i = 1, #all, 2 do
    if is_own(all[i]) then
      table.insert(fields, all[i])
      table.insert(fields, all[i + 1])
    end
  end
  return fields
end

-- HDEL in batches: unpack() is limited by Lua's stack.
local function hdel_all(key, names)
  for i = 1, #names, 1000 do
    redis.call('HDEL', key, unpack(names, i, math.min(i + 999, #names)))
  end
end

-- Delete every field but the steps (a new run continues where the last one stopped), the
-- parked duplicates (they wait for the key's next final outcome) and the marker that says
-- there are some. A record left without fields is gone, as after DEL.
local function delete_own_fields(key)
  local all = redis.call('HGETALL', key)
  local names = {}
  for i = 1, #all, 2 do
    if is_own(all[i]) then
      table.insert(names, all[i])
    end
  end
  hdel_all(key, names)
end

-- Lengthen the record's TTL to at least ms, never shorten it: a record outlives its lease
-- and its pending deadline, whatever the TTL setting.
local function expire_at_least(key, ms)
  if redis.call('PTTL', key) < tonumber(ms) then redis.call('PEXPIRE', key, ms) end
end

-- Wake the record's waiters (celery_idempotency/store/wakeups.py): an outcome is final or the
-- record is gone. A shard channel (Redis >= 7: on a Cluster it stays in the record's shard),
-- else a plain one (Redis 6). pcall: an ACL without channel permissions never fails the write.
local function wake(key)
  local channel = key .. ':wake'
  local sent = redis.pcall('SPUBLISH', channel, '1')
  if type(sent) == 'table' and sent.err then redis.pcall('PUBLISH', channel, '1') end
end

-- {'ok', task_id, value, task_id, value, ...}: a final write's reply, with the record's parked
-- duplicates (none: just {'ok'}, the common case, read from the marker alone). The parked stay
-- in the record: each is removed by the copy of its message that replays the outcome
-- (claim.lua). With drop_steps, the step fields go (the outcome is final: they are not needed
-- again), and the marker too when no parked duplicate or step is left. Called before the
-- outcome is written (HGETALL: the documented ACL has no HSCAN).
local function settle(key, marked, drop_steps)
  if not marked then return {'ok'} end
  local all = redis.call('HGETALL', key)
  local found, steps, kept = {'ok'}, {}, false
  for i = 1, #all, 2 do
    if is_parked(all[i]) then
      table.insert(found, string.sub(all[i], #PARK_PREFIX + 1))
      table.insert(found, all[i + 1])
      kept = true
    elseif is_step(all[i]) then
      if drop_steps then table.insert(steps, all[i]) else kept = true end
    end
  end
  hdel_all(key, steps)
  if not kept then redis.call('HDEL', key, EXTRAS) end
  return found
end
