-- refund_update.lua: move one refund to its next state (compare-and-set on its version), keep
-- the refunder's queue in step and tell the order writer, in one step.
--
-- KEYS[1] refunds  hash    order id -> JSON refund record (created by confirm_payment.lua)
-- KEYS[2] due      zset    order id -> when the refunder should next try (ms)
-- KEYS[3] changes  stream  for the order writer: {kind = "refund", ...the record}
-- ARGV[1] order id
-- ARGV[2] the version the caller read (the record is replaced only if it is still that one)
-- ARGV[3] the new record (JSON; its version must be ARGV[2] + 1)
-- ARGV[4] when to try next (ms), or -1 to take it off the queue (refunded, or for a person)
--
-- Returns {"ok"}, {"not_found"} or {"stale"} (another refunder moved it first: read again).

local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  return {'not_found'}
end
if tonumber(cjson.decode(current)['version']) ~= tonumber(ARGV[2]) then
  return {'stale'}
end
local record = cjson.decode(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if tonumber(ARGV[4]) >= 0 then
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
record['kind'] = 'refund'
record['order_id'] = ARGV[1]
redis.call('XADD', KEYS[3], '*', 'c', cmsgpack.pack(record))
return {'ok'}
