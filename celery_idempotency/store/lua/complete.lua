-- complete: started -> succeeded with the result, only for the current owner.
-- KEYS[1] record
-- ARGV[1] owner  ARGV[2] result  ARGV[3] content_type ('' = json)
-- ARGV[4] content_encoding ('' = utf-8)  ARGV[5] result_status ('' = stored)  ARGV[6] ttl_ms
-- returns {'ok'} | {'lost', <record fields>...}
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'o', 'st')
if f[1] ~= ARGV[1] then return reply('lost', rec) end
if f[2] == 'succeeded' then return {'ok'} end  -- our own write, retried
if f[2] ~= 'started' then return reply('lost', rec) end
redis.call('HDEL', rec, 'l')
redis.call('HSET', rec, 'st', 'succeeded', 'r', ARGV[2], 'u', now_ms())
if ARGV[3] ~= '' then redis.call('HSET', rec, 'ct', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', rec, 'ce', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', rec, 'rs', ARGV[5]) end
redis.call('PEXPIRE', rec, ARGV[6])
return {'ok'}
