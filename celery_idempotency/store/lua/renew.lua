-- renew: extend the lease of a claim we still own, and the record's TTL with it, so that the
-- record never ends before the lease (a task that runs longer than idempotency_ttl).
-- KEYS: record
-- ARGV: owner, lease_ms
-- Returns 1 if renewed, 0 if the claim is no longer ours
local rec = KEYS[1]
local owner, lease_ms = ARGV[1], ARGV[2]

if redis.call('HGET', rec, 'o') ~= owner or redis.call('HGET', rec, 'st') ~= STARTED then
  return 0
end
redis.call('HSET', rec, 'l', now_ms() + tonumber(lease_ms))
expire_at_least(rec, lease_ms)
return 1
