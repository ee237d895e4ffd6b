-- renew: extend the lease of a claim we still own, and the record's TTL with it, so that the
-- record never ends before the lease (a task that runs longer than idempotency_ttl).
-- KEYS[1] record
-- ARGV[1] owner  ARGV[2] lease_ms
-- returns 1 if renewed, 0 if the claim is no longer ours
local rec = KEYS[1]
if redis.call('HGET', rec, 'o') ~= ARGV[1] or redis.call('HGET', rec, 'st') ~= 'started' then
  return 0
end
redis.call('HSET', rec, 'l', now_ms() + tonumber(ARGV[2]))
expire_at_least(rec, ARGV[2])
return 1
