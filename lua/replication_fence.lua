-- replication_fence.lua: a write whose replica acknowledgement covers every write before it.
--
-- Replication is one ordered stream per primary: once a replica acknowledges this write
-- (the WAIT the coalescer sends after it on the same connection), it holds every entry the
-- writer read from this key space before calling it. The writer calls it before it commits
-- what it read (durability = "replicated"), so the store never holds an order that a
-- failover took back out of Redis.
--
-- KEYS[1] fence   string  a counter of the key space (its hash tag), kept a day
-- Returns the counter's new value.

local value = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 86400)
return value
