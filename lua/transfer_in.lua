-- transfer_in.lua: the receiving half of a move between two buckets (see transfer_out.lua):
-- put the units in transit on sale here, once per transfer id however often it is called.
--
-- KEYS[1] stock     string  quantity on sale in this bucket
-- KEYS[2] counters  hash    moved_in (cumulative quantity received)
-- KEYS[3] arrivals  zset    transfer id -> when (ms) it was taken in
-- ARGV[1] transfer id
-- ARGV[2] quantity (integer >= 1, as journaled by transfer_out.lua)
-- ARGV[3] how long an arrival is remembered, ms: far longer than a journal entry can wait
--         for the sweeper, so a late retry of the same id is still known
--
-- Returns {"applied", stock} or {"already", stock} (this id was taken in before: nothing done).

local quantity = tonumber(ARGV[2])
local keep_ms = tonumber(ARGV[3])
if not quantity or quantity < 1 or not keep_ms or ARGV[1] == '' then
  return redis.error_reply('ERR transfer_in: malformed arguments')
end
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return {'already', tonumber(redis.call('GET', KEYS[1]) or '0')}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms - keep_ms)
local left = redis.call('INCRBY', KEYS[1], quantity)
redis.call('HINCRBY', KEYS[2], 'moved_in', quantity)
redis.call('ZADD', KEYS[3], now_ms, ARGV[1])
return {'applied', left}
