-- transfer_out.lua: the giving half of moving stock between two buckets of one activity: take
-- up to ARGV[3] units off this bucket's stock and journal them as in transit, atomically.
--
-- A bucket is one key space of a hot item's stock (seckill/buckets.py); the receiving bucket
-- lives in another slot, so the move is two scripts: this one, then transfer_in.lua there,
-- then the journal entry is dropped (HDEL). A crash in between leaves the units journaled
-- here, never lost: the sweeper finishes entries older than a few seconds. Units are only
-- moved, never made: moved_out here and moved_in there keep each bucket's books,
-- initial + moved_in - moved_out == stock + reserved + paid.
--
-- KEYS[1] stock     string  quantity on sale in this bucket
-- KEYS[2] counters  hash    moved_out (cumulative quantity given away)
-- KEYS[3] moves     hash    transfer id -> "<receiving key space> <quantity> <at ms>"
-- ARGV[1] transfer id (fresh, random)
-- ARGV[2] the receiving bucket's key space
-- ARGV[3] most units to take (integer >= 1)
--
-- Returns {moved, left}: moved is 0 (and nothing written) when this bucket has none.

local want = tonumber(ARGV[3])
if not want or want < 1 or ARGV[1] == '' or ARGV[2] == '' then
  return redis.error_reply('ERR transfer_out: malformed arguments')
end
local available = tonumber(redis.call('GET', KEYS[1]) or '0')
local moved = math.min(want, available)
if moved <= 0 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return {0, available}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = redis.call('DECRBY', KEYS[1], moved)
redis.call('HINCRBY', KEYS[2], 'moved_out', moved)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. moved .. ' ' .. now_ms)
return {moved, left}
