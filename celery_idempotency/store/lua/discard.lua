-- discard: compare-and-delete. Deletes the record only if a field still holds our value.
-- Used to undo a reservation whose publish failed (field 't', state 'pending') and to drop
-- a claim whose task ended without an outcome (field 'o', state 'started').
-- KEYS[1] record
-- ARGV[1] field name ('t' or 'o')  ARGV[2] expected value  ARGV[3] required state
-- returns 1 if deleted, 0 otherwise
local rec = KEYS[1]
if redis.call('HGET', rec, ARGV[1]) == ARGV[2] and redis.call('HGET', rec, 'st') == ARGV[3] then
  redis.call('DEL', rec)
  return 1
end
return 0
