-- discard: compare-and-delete. Deletes the record only if every given field holds the given
-- value. Used to undo a reservation whose publish failed (t=<task id>, st=pending), to drop a
-- claim whose task ended without an outcome (o=<owner>, st=started), and by operators to
-- delete a record only if it has not changed since they looked at it (u=<updated>, f=<fence>).
-- KEYS: record
-- ARGV: field, value, field, value, ... (at least one pair)
-- Returns 1 if deleted, 0 otherwise
local rec = KEYS[1]
local conditions = ARGV

if redis.call('EXISTS', rec) == 0 then return 0 end
for i = 1, #conditions, 2 do
  if redis.call('HGET', rec, conditions[i]) ~= conditions[i + 1] then return 0 end
end
redis.call('DEL', rec)
wake(rec)
return 1
