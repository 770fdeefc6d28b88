-- create_activity.lua: create an activity, or replace one that has not opened, and load its
-- stock into Redis (the warm-up: the purchase path never reads the database).
--
-- KEYS[1] meta  KEYS[2] stock  KEYS[3] holders  KEYS[4] orders  KEYS[5] deadlines
-- KEYS[6] counters  KEYS[7] skus (hash SKU id -> quantity of it on sale)
-- KEYS[8] draw (hash: a lottery's seed and its commitment; optional)
-- ARGV: id, sku_id, title, price_cents, stock, per_user_limit, starts_at_ms, ends_at_ms,
--       payment_timeout_s, skus (JSON, "[]" for the single form), tiers (JSON),
--       requires_address ("1"/"0"), version (digest of the definition), opens_at_ms (the
--       earliest start, a tier's early access included), a lottery's seed and its commitment
--       ("" "" none), k, then k (name, value) pairs of optional meta fields (a fair sale's
--       registration_opens_at_ms, admission, claim_window_s; a bucketed activity's buckets,
--       and bucket_stock: this bucket's share of the stock, on sale here instead of ARGV[5]),
--       then SKU id, stock pairs (the single form: its one SKU; none for a bucketed activity,
--       which sells on the total). ARGV[10..] may be absent (a definition from before SKUs).
--       The first seed given stays: replacing the activity never changes a published
--       commitment (registrations are kept too).
--
-- Returns {"created"} or {"replaced"}, or {"conflict", reason} when the existing activity has
-- opened or already holds orders (nothing is changed then).

local existing = redis.call('HMGET', KEYS[1], 'starts_at_ms', 'opens_at_ms')
local existing_start = existing[2] or existing[1]
if existing_start then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now_ms >= tonumber(existing_start) then
    return {'conflict', 'activity has already started'}
  end
  if redis.call('HLEN', KEYS[4]) > 0 then
    return {'conflict', 'activity already holds orders'}
  end
end

redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('HSET', KEYS[1],
  'id', ARGV[1], 'sku_id', ARGV[2], 'title', ARGV[3], 'price_cents', ARGV[4],
  'stock', ARGV[5], 'per_user_limit', ARGV[6], 'starts_at_ms', ARGV[7],
  'ends_at_ms', ARGV[8], 'payment_timeout_s', ARGV[9])
local on_sale = ARGV[5]
if KEYS[7] and ARGV[10] then
  redis.call('HSET', KEYS[1], 'skus', ARGV[10], 'tiers', ARGV[11],
    'requires_address', ARGV[12], 'version', ARGV[13], 'opens_at_ms', ARGV[14])
  redis.call('DEL', KEYS[7])
  local extra = tonumber(ARGV[17])
  for i = 18, 17 + 2 * extra, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    if ARGV[i] == 'bucket_stock' then
      on_sale = ARGV[i + 1]
    end
  end
  if KEYS[8] and ARGV[15] ~= '' and redis.call('HEXISTS', KEYS[8], 'seed') == 0 then
    redis.call('HSET', KEYS[8], 'seed', ARGV[15], 'commitment', ARGV[16])
  end
  -- one counter per SKU, and per SKU the initial stock and the quantity held (reserved or
  -- paid): the report checks initial:<sku> == on sale + held:<sku> for each SKU
  for i = 18 + 2 * extra, #ARGV, 2 do
    redis.call('HSET', KEYS[7], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[6], 'initial:' .. ARGV[i], ARGV[i + 1], 'held:' .. ARGV[i], 0,
      'released:' .. ARGV[i], 0)
  end
end
redis.call('SET', KEYS[2], on_sale)
redis.call('HSET', KEYS[6], 'initial_stock', on_sale, 'orders_created', 0,
  'reserved', 0, 'paid', 0, 'released', 0)
if existing_start then
  return {'replaced'}
end
return {'created'}
