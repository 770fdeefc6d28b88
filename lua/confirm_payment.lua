-- confirm_payment.lua: apply a payment provider's callback to an order, exactly once per event.
-- Pay and expiry are both decided here and in release_stock.lua, atomically, so a payment
-- racing its own expiry ends in exactly one of paid or expired. An event id is bound to the
-- order and the payload it first came with: the same id with another order or payload is a
-- conflict, never another order's answer.
--
-- KEYS[1] meta       hash    price_cents
-- KEYS[2] orders     hash    order id -> msgpack order record
-- KEYS[3] deadlines  zset    order id -> payment deadline (ms)
-- KEYS[4] changes    stream  transitions and payment events for the order writer
-- KEYS[5] counters   hash    reserved, paid
-- KEYS[6] event      string  msgpack {order id, payload hash, answer} of this provider's event
-- KEYS[7] retiring   zset    order id -> time (ms) it ended (paid orders leave Redis later)
-- KEYS[8] legacy     string  the answer stored for this event id before events were bound to
--                            their order (read only: a provider retrying an old event still
--                            gets its answer and causes no second effect)
-- KEYS[9] refunds    hash    order id -> JSON refund record (optional: a provider with a
--                            refunds API; see refund_update.lua)
-- KEYS[10] refunds due zset  order id -> when the refunder should next try (ms)
-- ARGV[1] order id
-- ARGV[2] event id
-- ARGV[3] amount in cents
-- ARGV[4] "SUCCESS" or "FAILED"
-- ARGV[5] event answer ttl, seconds
-- ARGV[6] payload hash (hex sha256 of the callback's content)
-- ARGV[7] provider ("seckill", "wechatpay", ...)
-- ARGV[8] quantity of the order as the store holds it once the order has left Redis (it then
--         ended: paid, cancelled or expired), or 0 when the caller has not looked
-- ARGV[9] the unit price the store holds for that order (optional; "" or -1: the activity's)
-- ARGV[10] when the provider says the money was taken (ms), for a provider whose answers are
--         signed (WeChat Pay's success_time); "" or absent: now. A payer who paid before the
--         deadline keeps the order even when the news arrives after it, as long as the order
--         is still reserved (the sweeper holds a prepaid order until the provider answered).
--
-- Returns {result} with result in paid, refund_required, ignored (each stored for the event
-- id, so a replay answers the same and does nothing), or conflict (the event id is bound to
-- another order or payload), not_found (no such activity or order), gone (the order is not in
-- Redis: ask the store and call again with ARGV[8]), amount_mismatch (nothing stored, nothing
-- changed). A refund_required of a provider other than "seckill" also queues the refund
-- (KEYS[9], KEYS[10]) once per order: WeChat Pay takes money for one trade number at most once.

local stored = redis.call('GET', KEYS[6])
if stored then
  local event = cmsgpack.unpack(stored)
  if event[1] ~= ARGV[1] or event[2] ~= ARGV[6] then
    return {'conflict'}
  end
  return {event[3]}
end
local legacy = redis.call('GET', KEYS[8])
if legacy then
  return {legacy}
end
local price = redis.call('HGET', KEYS[1], 'price_cents')
if not price then
  return {'not_found'}
end
local blob = redis.call('HGET', KEYS[2], ARGV[1])
local order = nil
local quantity
-- the unit price the order was sold at (its SKU's, its member tier's); before SKUs: the activity's
local unit = nil
if blob then
  order = cmsgpack.unpack(blob)
  quantity = tonumber(order['quantity'])
  unit = tonumber(order['price_cents'])
elseif tonumber(ARGV[8]) > 0 then
  quantity = tonumber(ARGV[8])
  unit = tonumber(ARGV[9] or '')
else
  return {'gone'}
end
if not unit or unit < 0 then
  unit = tonumber(price)
end
local amount = tonumber(ARGV[3])
if amount ~= unit * quantity then
  return {'amount_mismatch'}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local attested = tonumber(ARGV[10] or '')
if attested and attested <= 0 then
  attested = nil
end
local in_time = false
if order then
  if attested then
    in_time = attested <= tonumber(order['expires_at'])
  else
    in_time = now_ms < tonumber(order['expires_at'])
  end
end
local result
if ARGV[4] ~= 'SUCCESS' then
  result = 'ignored'
elseif order and order['status'] == 'reserved' and in_time then
  result = 'paid'
else
  -- expired, cancelled, past its deadline, already paid under another event id, or gone
  -- from Redis (an order leaves Redis only once it has ended)
  result = 'refund_required'
end

if result == 'paid' then
  order['status'] = 'paid'
  order['paid_at'] = attested or now_ms
  redis.call('HSET', KEYS[2], ARGV[1], cmsgpack.pack(order))
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[7], now_ms, ARGV[1])
  redis.call('HINCRBY', KEYS[5], 'reserved', -quantity)
  redis.call('HINCRBY', KEYS[5], 'paid', quantity)
  redis.call('XADD', KEYS[4], '*', 'c', cmsgpack.pack({
    kind = 'transition', order = order, from = 'reserved', to = 'paid', at = now_ms,
  }))
end
redis.call('XADD', KEYS[4], '*', 'c', cmsgpack.pack({
  kind = 'payment', event_id = ARGV[2], order_id = ARGV[1], amount_cents = amount,
  result = result, at = now_ms, provider = ARGV[7],
}))
if result == 'refund_required' and ARGV[7] ~= 'seckill' and KEYS[10] then
  local refund = {
    order_id = ARGV[1], provider = ARGV[7], transaction_id = ARGV[2], amount_cents = amount,
    status = 'pending', attempts = 0, out_refund_no = '', refund_id = '', reason = '',
    created_at = now_ms, updated_at = now_ms, version = 1,
  }
  if redis.call('HSETNX', KEYS[9], ARGV[1], cjson.encode(refund)) == 1 then
    redis.call('ZADD', KEYS[10], now_ms, ARGV[1])
    refund['kind'] = 'refund'
    redis.call('XADD', KEYS[4], '*', 'c', cmsgpack.pack(refund))
  end
end
redis.call('SET', KEYS[6], cmsgpack.pack({ARGV[1], ARGV[6], result}), 'EX', tonumber(ARGV[5]))
return {result}
