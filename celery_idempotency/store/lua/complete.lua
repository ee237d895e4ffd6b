-- complete: started -> succeeded with the result, only for the current owner; the recorded
-- steps are dropped.
-- KEYS: record
-- ARGV: owner, result, content_type ('' = json), content_encoding ('' = utf-8),
--       result_status ('' = stored), ttl_ms
--       ('' = the default, left out of the record: see records.result_meta_fields)
-- Returns {'ok', <parked duplicates: task_id, value, ...>} | {'lost', <record fields>...}
local rec = KEYS[1]
local owner, result = ARGV[1], ARGV[2]
local content_type, content_encoding, result_status = ARGV[3], ARGV[4], ARGV[5]
local ttl_ms = ARGV[6]

local f = redis.call('HMGET', rec, 'o', 'st')
local held_by, state = f[1], f[2]
if held_by ~= owner then return reply('lost', rec) end
if state == 'succeeded' then return ok_with_parked(rec) end  -- our own write, retried
if state ~= 'started' then return reply('lost', rec) end
-- Parked duplicates: published again at once by the caller (docs/wakeups.md).
local out = ok_with_parked(rec)
redis.call('HDEL', rec, 'l')
redis.call('HSET', rec, 'st', 'succeeded', 'r', result, 'u', now_ms())
if content_type ~= '' then redis.call('HSET', rec, 'ct', content_type) end
if content_encoding ~= '' then redis.call('HSET', rec, 'ce', content_encoding) end
if result_status ~= '' then redis.call('HSET', rec, 'rs', result_status) end
-- The outcome is final: the steps that led to it are not needed again.
delete_fields(rec, true)
redis.call('PEXPIRE', rec, ttl_ms)
wake(rec)
return out
