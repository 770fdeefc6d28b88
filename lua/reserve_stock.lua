-- reserve_stock.lua: pre-lock stock for one order and queue it for the writer, atomically.
--
-- KEYS[1] meta       hash    activity definition (starts_at_ms, ends_at_ms, per_user_limit, ...)
-- KEYS[2] stock      string  quantity still on sale
-- KEYS[3] holders    hash    user id -> quantity held in live orders
-- KEYS[4] orders     hash    order id -> msgpack order record
-- KEYS[5] deadlines  zset    order id -> payment deadline (ms), read by the expiry sweeper
-- KEYS[6] stream     stream  accepted orders for the order writer (field "o": msgpack record)
-- KEYS[7] counters   hash    orders_created (count), reserved (quantity held, unpaid)
-- KEYS[8] idem       string  msgpack {fingerprint, order_id, quantity, expires_at_ms}
-- KEYS[9] user bucket  hash  token bucket of (activity, user)
-- KEYS[10] ip bucket   hash  token bucket of (activity, client IP)
-- KEYS[11] admission bucket  hash  the activity's cluster-wide admission token bucket
-- KEYS[12] skus       hash    SKU id -> quantity of that SKU on sale (absent before SKUs)
-- ARGV[1] user id
-- ARGV[2] quantity (integer >= 1)
-- ARGV[3] request fingerprint (same body <=> same fingerprint)
-- ARGV[4] candidate order id (used only if an order is created)
-- ARGV[5] idempotency ttl, seconds
-- ARGV[6] gate: "" to sell, or an error code ("degraded", "paused", "rate_limited", ...) that
--         answers after the idempotency check, so replays still replay
-- ARGV[7] user rate/s  ARGV[8] user burst  ARGV[9] ip rate/s  ARGV[10] ip burst
--         (rate 0: no such limit)
-- ARGV[11] limits mode: "enforce", or "shadow" (evaluated and counted, never refused)
-- ARGV[12] admission rate/s  ARGV[13] admission burst (exact across every gateway)
-- ARGV[14] SKU id ("" or absent: the activity's only SKU)
-- ARGV[15] the buyer's window start, ms (a member tier's early access; "": the activity's)
-- ARGV[16] the buyer's per-user limit ("": the activity's)
-- ARGV[17] unit price in cents recorded on the order ("": the activity's price_cents)
-- ARGV[18] the buyer's member tier ("" none)
-- ARGV[19] the definition version the gateway computed ARGV[15..17] from ("": not checked)
-- ARGV[20] the address, encrypted in the gateway and bound to ARGV[4] ("" none)
-- ARGV[21] keyed hash of the normalised address ("" none)
-- ARGV[14..21] are optional: a caller from before SKUs passes 13 arguments.
--
-- A fair sale (lua/turns.lua), only for an activity with registration: its keys come first
-- among the optional groups, from TURN_KEYS (the risk rules' then start after them):
-- KEYS[TURN_KEYS + 0..4] registrants, positions, turns (hashes), batches (zset), claims (hash)
--
-- Risk rules (lua/risk.lua), addressed from the bases RISK_KEYS and RISK_ARGV so that other
-- checks can add their own arguments beside them; optional (absent: no risk rules):
-- KEYS[RISK_KEYS + 0] devices    set   users who bought with the request's device here
-- KEYS[RISK_KEYS + 1] addresses  hash  keyed address hash -> orders created with it here
-- ARGV[RISK_ARGV + 0] the gateway's hits "<rule>:<mode>,..." (deny list, velocity; "" none)
-- ARGV[RISK_ARGV + 1] keyed hash of the request's X-Device-Id ("" none)
-- ARGV[RISK_ARGV + 2] most accounts per device (0: off)  ARGV[RISK_ARGV + 3] its mode
-- ARGV[RISK_ARGV + 4] most orders per address (0: off)   ARGV[RISK_ARGV + 5] its mode
-- ARGV[RISK_ARGV + 6] velocity subjects counted here (one Redis; absent or 0: the gateway
--         counted them), then per subject i: rule, mode, window ms, most at
--         ARGV[RISK_ARGV + 6 + 4(i-1) + 1..4], its counter at KEYS[RISK_KEYS + 1 + i]
--
-- Returns one of
--   {"ok", order_id, quantity, expires_at_ms, stock_left, sku_stock_left}
--   {"replay", order_id, quantity, expires_at_ms}
--   {"rate_limited", scope, retry_after_ms}    scope: user, ip or admission
--   {"risk_refused", rule}                     an enforced risk rule refused the attempt
--   {"not_your_turn", retry_after_ms, why}     why: waiting, passed, used
--   {"undrawn", retry_after_ms, "draw"}        a lottery past its start, not drawn yet
--   {"not_registered"}
--   {code}  with code in not_found, reused, <gate>, stale (the gateway's definition is not
--           the stored one: re-read and retry), not_started, ended, limit_reached, sold_out,
--           unknown_sku, collision
-- and every answer decided after the risk rules ends with {"risk", "<rule>:<mode>", ...} when
-- a rule hit (risk_reply), so the gateway counts shadow hits too.
--
-- Every check runs before the first write: Redis does not roll back a script that fails halfway.
-- (Taking a rate-limit token is the attempt's own outcome, not a half-done purchase.)

--! include take_token.lua
--! include turns.lua
--! include risk.lua
--! include risk_velocity.lua

-- base offsets of the optional groups (renumbered here when another group is added)
local TURN_KEYS = 13
local RISK_KEYS = 13
local RISK_ARGV = 22

local user = ARGV[1]
local quantity = tonumber(ARGV[2])
local fingerprint = ARGV[3]
local order_id = ARGV[4]
local idem_ttl = tonumber(ARGV[5])
local gate = ARGV[6]

local meta = redis.call('HMGET', KEYS[1], 'id', 'starts_at_ms', 'ends_at_ms',
                        'per_user_limit', 'payment_timeout_s', 'sku_id', 'price_cents', 'version',
                        'registration_opens_at_ms', 'admission', 'claim_window_s')
if not meta[1] then
  return {'not_found'}
end
if meta[9] then
  RISK_KEYS = TURN_KEYS + 5  -- the turn keys come first
end

local stored = redis.call('GET', KEYS[8])
if stored then
  local answer = cmsgpack.unpack(stored)
  if answer[1] ~= fingerprint then
    return {'reused'}
  end
  return {'replay', answer[2], answer[3], answer[4]}
end

-- velocity counted in this step (one Redis): ARGV[RISK_ARGV + 6] subjects, each
-- "rule, mode, window ms, most" after it, their counters at KEYS[RISK_KEYS + 2 ...]
local velocity_n = tonumber(ARGV[RISK_ARGV + 6] or '') or 0

-- switches answer here; the local admission bucket is a rate limit, so in a sale with
-- registration (or with velocity to count) it answers after the registration, turn and risk
-- checks, as the contract orders
local limited_locally = gate == 'rate_limited' and (meta[9] or velocity_n > 0)
if gate ~= '' and not limited_locally then
  return {gate}
end

local function given(i, default)
  local value = ARGV[i]
  if value == nil or value == '' then
    return default
  end
  return value
end
local version = given(19, '')
if version ~= '' and meta[8] and version ~= meta[8] then
  return {'stale'}
end
local sku = given(14, meta[6])
local starts_at_ms = tonumber(given(15, meta[2]))
local limit = tonumber(given(16, meta[4]))
local price = tonumber(given(17, meta[7]))
local tier = given(18, '')
local address = given(20, '')
local address_hash = given(21, '')
if not (starts_at_ms and limit and limit >= 1 and price and price >= 0) then
  -- a caller's bug, not a shopper's outcome: refuse before any write
  return redis.error_reply('ERR reserve_stock: malformed terms (start, limit, price)')
end
for i = 1, velocity_n do
  local at = RISK_ARGV + 6 + (i - 1) * 4
  local window, most = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  if not (KEYS[RISK_KEYS + 1 + i] and window and window >= 1000 and most and most >= 1) then
    return redis.error_reply('ERR reserve_stock: malformed velocity ' .. i)
  end
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- registration and turn (403 not_registered, 409 not_your_turn), after switches
local turn_keys = nil
local turn_batch_end = nil
if meta[9] then
  if not KEYS[TURN_KEYS + 4] then
    return {'stale'}  -- the gateway's definition predates the registration: re-read it
  end
  turn_keys = {
    registrants = KEYS[TURN_KEYS + 0], positions = KEYS[TURN_KEYS + 1],
    turns = KEYS[TURN_KEYS + 2], batches = KEYS[TURN_KEYS + 3], claims = KEYS[TURN_KEYS + 4],
    stock = KEYS[2],
  }
  local fair = {
    admission = meta[10], claim_ms = tonumber(meta[11] or '0') * 1000,
    unit = tonumber(meta[4]), starts_ms = tonumber(meta[2]), ends_ms = tonumber(meta[3]),
  }
  local refusal
  refusal, turn_batch_end = check_turn(turn_keys, user, fair, now_ms)
  if refusal then
    return refusal
  end
end

-- risk rules, after switches and before rate limits (the contract's order); reads only
local risk_on = KEYS[RISK_KEYS + 1] ~= nil
local device = risk_on and given(RISK_ARGV + 1, '') or ''
local risk_hits = {}
if risk_on then
  -- the attempt's own count, like a rate-limit token: every attempt counts, refused ones too
  local pre = ARGV[RISK_ARGV + 0] or ''
  for i = 1, velocity_n do
    local at = RISK_ARGV + 6 + (i - 1) * 4
    if velocity_count(KEYS[RISK_KEYS + 1 + i], tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4]),
                      now_ms) then
      pre = pre .. (pre == '' and '' or ',') .. ARGV[at + 1] .. ':' .. ARGV[at + 2]
    end
  end
  local refused
  refused, risk_hits = risk_assess(
    KEYS[RISK_KEYS + 0], KEYS[RISK_KEYS + 1], user, device, address_hash,
    pre,
    {ARGV[RISK_ARGV + 2], ARGV[RISK_ARGV + 3], ARGV[RISK_ARGV + 4], ARGV[RISK_ARGV + 5]})
  if refused then
    return risk_reply({'risk_refused', refused}, risk_hits)
  end
end
if limited_locally then
  return risk_reply({gate}, risk_hits)
end

-- rate limits, after idempotency and switches, before the window (the contract's order).
-- A token taken is spent on the attempt whatever its outcome: limits count attempts.
local buckets = {
  {'user', KEYS[9], tonumber(ARGV[7]), tonumber(ARGV[8])},
  {'ip', KEYS[10], tonumber(ARGV[9]), tonumber(ARGV[10])},
  {'admission', KEYS[11], tonumber(ARGV[12]), tonumber(ARGV[13])},
}
for _, bucket in ipairs(buckets) do
  if bucket[3] > 0 then
    local allowed, _, retry = take_token(bucket[2], bucket[3], bucket[4], 1, now_ms)
    if allowed == 0 then
      if ARGV[11] == 'shadow' then
        redis.call('HINCRBY', KEYS[7], 'shadow_limited_' .. bucket[1], 1)
      else
        redis.call('HINCRBY', KEYS[7], 'rate_limited_' .. bucket[1], 1)
        return risk_reply({'rate_limited', bucket[1], retry}, risk_hits)
      end
    end
  end
end
if now_ms < starts_at_ms then
  return risk_reply({'not_started'}, risk_hits)
end
if now_ms >= tonumber(meta[3]) then
  return risk_reply({'ended'}, risk_hits)
end

-- limit_reached wins over sold_out: a user at the limit learns why, whatever the stock
local held = tonumber(redis.call('HGET', KEYS[3], user) or '0')
if held + quantity > limit then
  return risk_reply({'limit_reached'}, risk_hits)
end
local available = tonumber(redis.call('GET', KEYS[2]) or '0')
if available < quantity then
  return risk_reply({'sold_out'}, risk_hits)
end
-- per SKU: its own counter; an activity from before SKUs has none and sells on the total
local sku_key = KEYS[12]
local sku_left = nil
if sku_key and redis.call('EXISTS', sku_key) == 1 then
  sku_left = redis.call('HGET', sku_key, sku)
  if not sku_left then
    return risk_reply({'unknown_sku'}, risk_hits)
  end
  if tonumber(sku_left) < quantity then
    return risk_reply({'sold_out'}, risk_hits)
  end
end
if redis.call('HEXISTS', KEYS[4], order_id) == 1 then
  return risk_reply({'collision'}, risk_hits)
end

-- writes: all checks passed
local expires_at_ms = now_ms + tonumber(meta[5]) * 1000
local fields = {
  order_id = order_id, activity_id = meta[1], user_id = user, quantity = quantity,
  status = 'reserved', created_at = now_ms, expires_at = expires_at_ms, paid_at = 0,
  sku_id = sku, price_cents = price,
}
if tier ~= '' then
  fields['tier'] = tier
end
if address ~= '' then
  fields['address'] = address
  fields['address_hash'] = address_hash
end
local record = cmsgpack.pack(fields)
local left = redis.call('DECRBY', KEYS[2], quantity)
if sku_left then
  sku_left = redis.call('HINCRBY', sku_key, sku, -quantity)
  redis.call('HINCRBY', KEYS[7], 'held:' .. sku, quantity)
end
redis.call('HINCRBY', KEYS[3], user, quantity)
redis.call('HSET', KEYS[4], order_id, record)
redis.call('ZADD', KEYS[5], expires_at_ms, order_id)
redis.call('XADD', KEYS[6], '*', 'o', record)
redis.call('HINCRBY', KEYS[7], 'orders_created', 1)
redis.call('HINCRBY', KEYS[7], 'reserved', quantity)
redis.call('SET', KEYS[8], cmsgpack.pack({fingerprint, order_id, quantity, expires_at_ms}),
           'EX', idem_ttl)
if turn_batch_end then
  use_turn(turn_keys, user, order_id, turn_batch_end)
end
if risk_on then
  -- kept a day past the sale's end: long enough for every check that can still buy
  risk_record(KEYS[RISK_KEYS + 0], KEYS[RISK_KEYS + 1], user, device, address_hash,
              tonumber(meta[3]) + 86400000)
end
return risk_reply({'ok', order_id, quantity, expires_at_ms, left, sku_left or left}, risk_hits)
