-- release_stock.lua: end a reserved order (cancelled by its owner, or expired by the sweeper)
-- and put its stock back on sale, exactly once.
--
-- KEYS[1] stock      string  quantity on sale
-- KEYS[2] holders    hash    user id -> quantity held in live orders
-- KEYS[3] orders     hash    order id -> msgpack order record
-- KEYS[4] deadlines  zset    order id -> payment deadline (ms)
-- KEYS[5] changes    stream  status transitions for the order writer (field "c": msgpack)
-- KEYS[6] counters   hash    reserved (held, unpaid), released (cumulative), and per SKU
--                            held:<sku>, released:<sku>
-- KEYS[7] retiring   zset    order id -> time (ms) it ended; the Retirer drops the record from
--                            Redis once the store holds it in that state (bounded memory)
-- KEYS[8] skus       hash    SKU id -> quantity on sale (optional; absent before SKUs)
-- KEYS[9] prepays    hash    order id -> the payment order placed with a provider (optional)
-- KEYS[TURN_KEYS + 0..2]  meta, turns, batches of a lottery sale (optional): the stock put back
--         admits the next positions in the same step (turns.lua), never whoever calls fastest
-- ARGV[1] order id
-- ARGV[2] cause: "cancelled" (owner's request) or "expired" (sweeper)
-- ARGV[3] user id that must own the order ("" for the sweeper)
-- ARGV[4] "settled" when the payment provider said nobody paid and nobody can any more (its
--         order closed); otherwise an expiry of an order with a prepay is refused (prepaid):
--         the provider decides first (seckill/payments/deadline.py)
--
-- Returns {"released", stock_left, quantity} or {code} with code in not_found,
-- not_cancellable (not reserved any more), not_due (an expiry before its deadline), prepaid
-- (an expiry the payment provider must settle first).
-- Every check runs before the first write.

--! include turns.lua

local TURN_KEYS = 10

local blob = redis.call('HGET', KEYS[3], ARGV[1])
if not blob then
  return {'not_found'}
end
local order = cmsgpack.unpack(blob)
if ARGV[3] ~= '' and order['user_id'] ~= ARGV[3] then
  return {'not_found'}
end
if order['status'] ~= 'reserved' then
  return {'not_cancellable'}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == 'expired' and now_ms < tonumber(order['expires_at']) then
  return {'not_due'}
end
local settled = ARGV[4] == 'settled'
if ARGV[2] == 'expired' and KEYS[9] and not settled
    and redis.call('HEXISTS', KEYS[9], ARGV[1]) == 1 then
  return {'prepaid'}
end

local quantity = tonumber(order['quantity'])
order['status'] = ARGV[2]
local record = cmsgpack.pack(order)
redis.call('HSET', KEYS[3], ARGV[1], record)
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[7], now_ms, ARGV[1])
local left = redis.call('INCRBY', KEYS[1], quantity)
if redis.call('HINCRBY', KEYS[2], order['user_id'], -quantity) <= 0 then
  redis.call('HDEL', KEYS[2], order['user_id'])
end
redis.call('HINCRBY', KEYS[6], 'reserved', -quantity)
redis.call('HINCRBY', KEYS[6], 'released', quantity)
if KEYS[8] and order['sku_id'] and redis.call('HEXISTS', KEYS[8], order['sku_id']) == 1 then
  redis.call('HINCRBY', KEYS[8], order['sku_id'], quantity)
  redis.call('HINCRBY', KEYS[6], 'held:' .. order['sku_id'], -quantity)
  redis.call('HINCRBY', KEYS[6], 'released:' .. order['sku_id'], quantity)
end
redis.call('XADD', KEYS[5], '*', 'c', cmsgpack.pack({
  kind = 'transition', order = order, from = 'reserved', to = ARGV[2], at = now_ms,
}))
if settled and KEYS[9] then
  redis.call('HDEL', KEYS[9], ARGV[1])
end
if KEYS[TURN_KEYS] then
  local fair = redis.call('HMGET', KEYS[TURN_KEYS], 'admission', 'claim_window_s',
                          'per_user_limit', 'starts_at_ms', 'ends_at_ms')
  if fair[1] == 'lottery' and now_ms >= tonumber(fair[4]) and now_ms < tonumber(fair[5]) then
    advance_turns(KEYS[TURN_KEYS + 1], KEYS[TURN_KEYS + 2], KEYS[1], now_ms,
                  tonumber(fair[2]) * 1000, tonumber(fair[3]))
  end
end
return {'released', left, quantity}
