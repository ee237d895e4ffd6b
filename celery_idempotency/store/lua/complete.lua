-- complete: started -> succeeded with the result, only for the current claim; the recorded
-- steps are dropped, and so are the owner token and the creation time: a succeeded record
-- keeps only what a replay, the state machine and the CLI read (bytes per record, for days).
-- KEYS: record
-- ARGV: owner, fence (the claim's), result, content_type ('' = json),
--       content_encoding ('' = utf-8), result_status ('' = stored), ttl_ms
--       ('' = the default, left out of the record: see records.result_meta_fields)
-- Returns {'ok', <parked duplicates: task_id, value, ...>} | {'lost', <record fields>...}
local rec = KEYS[1]
local owner, fence, result = ARGV[1], ARGV[2], ARGV[3]
local content_type, content_encoding, result_status = ARGV[4], ARGV[5], ARGV[6]
local ttl_ms = ARGV[7]

local f = redis.call('HMGET', rec, 'o', 'st', 'f', EXTRAS)
local held_by, state, held_fence, marked = f[1], f[2], f[3], f[4]
-- Our own write, retried (the reply was lost): the owner token is gone, but the fence stays
-- and no other claim ever had it (every claim bumps it).
if state == SUCCEEDED and held_fence == fence then return settle(rec, marked, true) end
if state ~= STARTED or held_by ~= owner then return reply('lost', rec) end
-- Parked duplicates: published again at once by the caller (docs/wakeups.md). The outcome is
-- final: the steps that led to it are not needed again.
local out = settle(rec, marked, true)
redis.call('HDEL', rec, 'l', 'o', 'c')
-- One HSET: a script's commands cost on the hot path of every task.
local fields = {'st', SUCCEEDED, 'r', result, 'u', now_ms()}
if content_type ~= '' then fields[#fields + 1] = 'ct'; fields[#fields + 1] = content_type end
if content_encoding ~= '' then
  fields[#fields + 1] = 'ce'; fields[#fields + 1] = content_encoding
end
if result_status ~= '' then fields[#fields + 1] = 'rs'; fields[#fields + 1] = result_status end
redis.call('HSET', rec, unpack(fields))
redis.call('PEXPIRE', rec, ttl_ms)
wake(rec)
return out
