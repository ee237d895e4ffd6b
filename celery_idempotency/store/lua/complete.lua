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

local f = redis.call('HMGET', rec, 'o', 'st', 'f')
local held_by, state, held_fence = f[1], f[2], f[3]
-- Our own write, retried (the reply was lost): the owner token is gone, but the fence stays
-- and no other claim ever had it (every claim bumps it).
if state == SUCCEEDED and held_fence == fence then return ok_with_parked(rec) end
if state ~= STARTED or held_by ~= owner then return reply('lost', rec) end
-- Parked duplicates: published again at once by the caller (docs/wakeups.md).
local out = ok_with_parked(rec)
redis.call('HDEL', rec, 'l', 'o', 'c')
redis.call('HSET', rec, 'st', SUCCEEDED, 'r', result, 'u', now_ms())
if content_type ~= '' then redis.call('HSET', rec, 'ct', content_type) end
if content_encoding ~= '' then redis.call('HSET', rec, 'ce', content_encoding) end
if result_status ~= '' then redis.call('HSET', rec, 'rs', result_status) end
-- The outcome is final: the steps that led to it are not needed again.
delete_fields(rec, true)
redis.call('PEXPIRE', rec, ttl_ms)
wake(rec)
return out
