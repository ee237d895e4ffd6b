-- fail: started -> failed with the error, only for the current owner.
-- KEYS[1] record
-- ARGV[1] owner  ARGV[2] error (JSON)  ARGV[3] retryable ('1' or '0')  ARGV[4] ttl_ms
-- returns {'ok'} | {'lost', <record fields>...}
local rec = KEYS[1]
if redis.call('HGET', rec, 'o') ~= ARGV[1] then return reply('lost', rec) end
local state = redis.call('HGET', rec, 'st')
if state == 'failed' then return {'ok'} end  -- our own write, retried
if state ~= 'started' then return reply('lost', rec) end
redis.call('HDEL', rec, 'l')
redis.call('HSET', rec, 'st', 'failed', 'e', ARGV[2], 'ry', ARGV[3], 'u', now_ms())
redis.call('PEXPIRE', rec, ARGV[4])
return {'ok'}
