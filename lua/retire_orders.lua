-- retire_orders.lua: drop ended orders from Redis once the store holds them in the same state.
--
-- KEYS[1] orders    hash  order id -> msgpack order record
-- KEYS[2] retiring  zset  order id -> time (ms) it ended
-- ARGV    pairs: order id, its status in the store ("" when the store does not have it)
--
-- Returns {records removed, ids taken off the queue}. A record is removed only when its Redis
-- status is terminal and equals the store's; one still reserved, or whose ended state the store
-- has not recorded yet, stays (and stays queued in retiring). An id with no record leaves the
-- queue. Each id is checked before its own writes; ids are independent of one another.

local terminal = {paid = true, cancelled = true, expired = true}
local removed = 0
local dequeued = 0
for i = 1, #ARGV, 2 do
  local order_id, stored = ARGV[i], ARGV[i + 1]
  local blob = redis.call('HGET', KEYS[1], order_id)
  if not blob then
    dequeued = dequeued + redis.call('ZREM', KEYS[2], order_id)
  else
    local status = cmsgpack.unpack(blob)['status']
    if terminal[status] and status == stored then
      redis.call('HDEL', KEYS[1], order_id)
      dequeued = dequeued + redis.call('ZREM', KEYS[2], order_id)
      removed = removed + 1
    end
  end
end
return {removed, dequeued}
