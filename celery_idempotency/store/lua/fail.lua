-- fail: started -> failed with the error, only for the current owner; the recorded steps
-- are dropped unless it is retryable.
-- KEYS: record
-- ARGV: owner, error (JSON), retryable ('1' or '0'), ttl_ms
-- Returns {'ok', <parked duplicates: task_id, value, ...>} | {'lost', <record fields>...}
local rec = KEYS[1]
local owner, error_json, retryable, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local f = redis.call('HMGET', rec, 'o', 'st', EXTRAS)
local held_by, state, marked = f[1], f[2], f[3]
if held_by ~= owner then return reply('lost', rec) end
if state == FAILED then return settle(rec, marked, retryable ~= '1') end  -- our own write, retried
if state ~= STARTED then return reply('lost', rec) end
-- Parked duplicates: published again at once by the caller (docs/wakeups.md). A cached error
-- is final: its steps go. A retryable one keeps them, so that the next run continues where
-- this one stopped.
local out = settle(rec, marked, retryable ~= '1')
redis.call('HDEL', rec, 'l')
redis.call('HSET', rec, 'st', FAILED, 'e', error_json, 'ry', retryable, 'u', now_ms())
redis.call('PEXPIRE', rec, ttl_ms)
wake(rec)
return out
