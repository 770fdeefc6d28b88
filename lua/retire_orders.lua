-- retire_orders.lua: drop ended orders from Redis once the store holds them in the same state.
--
-- KEYS[1] orders    hash  order id -> msgpack order record
-- KEYS[2] retiring  zset  order id -> time (ms) it ended (or was last looked at, see ARGV[1])
-- ARGV[1] requeue before (ms): a record kept although queued before this moves to the back of
--         the queue (score ARGV[2]), so an order whose ending never reaches the store (a dead
--         letter) does not hold up the ones behind it
-- ARGV[2] now (ms, Redis time)
-- ARGV[3..] pairs: order id, its status in the store ("" when the store does not have it)
--
-- Returns {records removed, ids taken off the queue}. A record is removed only when its Redis
-- status is terminal and equals the store's; one still reserved, or whose ended state the store
-- has not recorded yet, stays (and stays queued in retiring). An id with no record leaves the
-- queue. Each id is checked before its own writes; ids are independent of one another.

local terminal = {paid = true, cancelled = true, expired = true}
local removed = 0
local dequeued = 0
local requeue_before = tonumber(ARGV[1])
for i = 3, #ARGV, 2 do
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
    else
      local queued = tonumber(redis.call('ZSCORE', KEYS[2], order_id) or '0')
      if queued > 0 and queued < requeue_before then
        redis.call('ZADD', KEYS[2], 'XX', ARGV[2], order_id)
      end
    end
  end
end
return {removed, dequeued}
