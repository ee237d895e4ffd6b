-- fail: started -> failed with the error, only for the current owner.
-- KEYS[1] record
-- ARGV[1] owner  ARGV[2] error (JSON)  ARGV[3] retryable ('1' or '0')  ARGV[4] ttl_ms
-- returns {'ok'} | {'lost', <record fields>...}
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'o', 'st')
if f[1] ~= ARGV[1] then return reply('lost', rec) end
if f[2] == 'failed' then return {'ok'} end  -- our own write, retried
if f[2] ~= 'started' then return reply('lost', rec) end
redis.call('HDEL', rec, 'l')
redis.call('HSET', rec, 'st', 'failed', 'e', ARGV[2], 'ry', ARGV[3], 'u', now_ms())
redis.call('PEXPIRE', rec, ARGV[4])
return {'ok'}
