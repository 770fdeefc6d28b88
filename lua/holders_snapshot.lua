-- holders_snapshot.lua: who holds orders, and the order count and stock that goes with it, read
-- at one instant (the sold-out fast path answers sold_out without Redis only to users outside
-- this set, and only while the count has not moved since).
--
-- KEYS[1] stock     string  quantity on sale
-- KEYS[2] counters  hash    orders_created
-- KEYS[3] holders   hash    user id -> quantity held in live orders
-- KEYS[4] skus      hash    SKU id -> quantity on sale (absent before SKUs)
-- ARGV    (optional) more fields of KEYS[2] to read at the same instant (a bucket's counts)
--
-- Returns {stock, orders_created, holder ids, SKU stock (flat), the ARGV fields' values};
-- "0" for a missing count.
-- Read-only: it writes nothing. (A script rather than MULTI: one round trip on a single
-- Redis and on a Cluster alike, where the four keys share the activity's slot.)

return {
  redis.call('GET', KEYS[1]) or '0',
  redis.call('HGET', KEYS[2], 'orders_created') or '0',
  redis.call('HKEYS', KEYS[3]),
  redis.call('HGETALL', KEYS[4]),
  #ARGV > 0 and redis.call('HMGET', KEYS[2], unpack(ARGV)) or {},
}
