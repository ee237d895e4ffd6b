-- Shared prelude, prepended to every script when it is loaded (Lua has no include).
-- Field names: see celery_idempotency/records.py.
-- Time is the server's own (TIME): workers with skewed clocks still agree on lease expiry.
-- Redis >= 5 replicates script effects, so calling TIME before writing is safe.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- {status, field, value, field, value, ...}: the status and the whole record in one reply.
local function reply(status, key)
  local fields = redis.call('HGETALL', key)
  table.insert(fields, 1, status)
  return fields
end

local function lease_alive(key, now)
  return tonumber(redis.call('HGET', key, 'l') or '0') > now
end
