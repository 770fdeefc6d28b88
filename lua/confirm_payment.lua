-- confirm_payment.lua: apply a payment provider's callback to an order, exactly once per event.
-- Pay and expiry are both decided here and in release_stock.lua, atomically, so a payment
-- racing its own expiry ends in exactly one of paid or expired.
--
-- KEYS[1] meta       hash    price_cents
-- KEYS[2] orders     hash    order id -> msgpack order record
-- KEYS[3] deadlines  zset    order id -> payment deadline (ms)
-- KEYS[4] changes    stream  transitions and payment events for the order writer
-- KEYS[5] counters   hash    reserved, paid
-- KEYS[6] event      string  the stored answer of this event id
-- ARGV[1] order id
-- ARGV[2] event id
-- ARGV[3] amount in cents
-- ARGV[4] "SUCCESS" or "FAILED"
-- ARGV[5] event answer ttl, seconds
--
-- Returns {result} with result in paid, refund_required, ignored (each stored for the event
-- id, so a replay answers the same and does nothing), or not_found / amount_mismatch
-- (nothing stored, nothing changed).

local stored = redis.call('GET', KEYS[6])
if stored then
  return {stored}
end
local blob = redis.call('HGET', KEYS[2], ARGV[1])
if not blob then
  return {'not_found'}
end
local order = cmsgpack.unpack(blob)
-- the unit price the order was sold at (SKU, member tier); older records: the activity's
local price = tonumber(order['price_cents'] or redis.call('HGET', KEYS[1], 'price_cents') or '-1')
local amount = tonumber(ARGV[3])
if amount ~= price * tonumber(order['quantity']) then
  return {'amount_mismatch'}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local result
if ARGV[4] ~= 'SUCCESS' then
  result = 'ignored'
elseif order['status'] == 'reserved' and now_ms < tonumber(order['expires_at']) then
  result = 'paid'
else
  -- expired, cancelled, past its deadline, or already paid under another event id
  result = 'refund_required'
end

if result == 'paid' then
  local quantity = tonumber(order['quantity'])
  order['status'] = 'paid'
  order['paid_at'] = now_ms
  redis.call('HSET', KEYS[2], ARGV[1], cmsgpack.pack(order))
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[5], 'reserved', -quantity)
  redis.call('HINCRBY', KEYS[5], 'paid', quantity)
  redis.call('XADD', KEYS[4], '*', 'c', cmsgpack.pack({
    kind = 'transition', order = order, from = 'reserved', to = 'paid', at = now_ms,
  }))
end
redis.call('XADD', KEYS[4], '*', 'c', cmsgpack.pack({
  kind = 'payment', event_id = ARGV[2], order_id = ARGV[1], amount_cents = amount,
  result = result, at = now_ms,
}))
redis.call('SET', KEYS[6], result, 'EX', tonumber(ARGV[5]))
return {result}
