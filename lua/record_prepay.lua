-- record_prepay.lua: the payment order placed with a provider for a reserved order, stored once.
-- Checked against the order in the same step, so a prepay is only ever handed to the payer
-- while the order is reserved and before its deadline: the sweeper, which acts only after the
-- deadline, then always sees the prepay and lets the provider settle it first.
--
-- KEYS[1] orders   hash  order id -> msgpack order record
-- KEYS[2] prepays  hash  order id -> JSON {prepay_id, out_trade_no, amount_cents, openid, at}
-- ARGV[1] order id
-- ARGV[2] user id that must own the order
-- ARGV[3] the prepay record to store (JSON), or "" to look only
--
-- Returns {"exists", record} (the one stored first: a repeat hands out the same prepay),
-- {"stored", record}, {"none"} (looking only, nothing stored yet), or {code} with code in
-- not_found (no such order, or someone else's), not_payable (not reserved, or past its
-- deadline). Every check runs before the only write.

local blob = redis.call('HGET', KEYS[1], ARGV[1])
if not blob then
  return {'not_found'}
end
local order = cmsgpack.unpack(blob)
if order['user_id'] ~= ARGV[2] then
  return {'not_found'}
end
local existing = redis.call('HGET', KEYS[2], ARGV[1])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if order['status'] ~= 'reserved' or now_ms >= tonumber(order['expires_at']) then
  return {'not_payable'}
end
if existing then
  return {'exists', existing}
end
if ARGV[3] == '' then
  return {'none'}
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return {'stored', ARGV[3]}
