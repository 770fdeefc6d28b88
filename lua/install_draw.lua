-- install_draw.lua: make a lottery's draw the activity's order, exactly once.
--
-- The gateway computes the order from the committed seed and the registrant list (final once
-- the sale has started: register.lua closes at starts_at by the same Redis clock) and writes
-- user -> position into a staging hash of its own; this script then checks and swaps it in.
-- Two gateways drawing at once compute the same order; only the first install counts.
--
-- KEYS[1] meta     hash  admission, starts_at_ms, claim_window_s, per_user_limit
-- KEYS[2] draw     hash  seed, commitment; gains drawn_at_ms, count, digest
-- KEYS[3] positions hash user -> position (the result)
-- KEYS[4] staging  hash  this drawer's user -> position
-- KEYS[5] turns    hash  (turns.lua)
-- KEYS[6] batches  zset  (turns.lua)
-- KEYS[7] stock    string quantity on sale
-- KEYS[8] order    list  registrants in registration order
-- ARGV[1] number of positions in the staging hash
-- ARGV[2] digest of the order (hex SHA-256 of the user ids in order, "\n"-joined)
--
-- Returns {"installed", admitted up to} | {"drawn"} (someone else installed it first) |
-- {code} with code in not_lottery, early (before starts_at), mismatch (the staging hash does
-- not hold every registrant once). The staging hash is removed in every case.
-- Every check runs before the first write (removing the staging hash is the drawer's own).

--! include turns.lua

local meta = redis.call('HMGET', KEYS[1], 'admission', 'starts_at_ms', 'claim_window_s',
                        'per_user_limit')
local count = tonumber(ARGV[1])
local refusal = nil
if meta[1] ~= 'lottery' then
  refusal = 'not_lottery'
elseif redis.call('HEXISTS', KEYS[5], 'n') == 1 then
  refusal = 'drawn'
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not refusal and now_ms < tonumber(meta[2]) then
  refusal = 'early'
end
if not refusal and (redis.call('LLEN', KEYS[8]) ~= count
                    or redis.call('HLEN', KEYS[4]) ~= count) then
  refusal = 'mismatch'
end
if refusal then
  redis.call('UNLINK', KEYS[4])
  return {refusal}
end

if count > 0 then
  redis.call('RENAME', KEYS[4], KEYS[3])
  redis.call('PERSIST', KEYS[3])  -- the staging hash's TTL (an abandoned drawer's) moved with it
else
  redis.call('DEL', KEYS[3])
end
redis.call('DEL', KEYS[6])
redis.call('HSET', KEYS[5], 'n', count, 'p', 0, 'l', 0, 'open', 0)
redis.call('HSET', KEYS[2], 'drawn_at_ms', now_ms, 'count', count, 'digest', ARGV[2])
local state = advance_turns(KEYS[5], KEYS[6], KEYS[7], now_ms, tonumber(meta[3]) * 1000,
                            tonumber(meta[4]))
return {'installed', state[2]}
