-- queue_position.lua: where one user stands in a sale (GET /api/v1/activities/{id}/queue).
--
-- KEYS[1] meta  KEYS[2] registrants  KEYS[3] positions  KEYS[4] turns  KEYS[5] batches
-- KEYS[6] stock  KEYS[7] claims        (turns.lua explains them)
-- ARGV[1] user id
--
-- Returns {status, registered (0|1), position (-1 none), ahead (-1 none), eta ms (-1 unknown),
--          claim ends ms (0 none), now ms}, status one of
--   not_found; fcfs (no turns: buying is first come first served); upcoming (before
--   starts_at); ended; undrawn (a lottery past its start, not drawn yet); and for a drawn
--   lottery: unplaced (not registered), waiting, admitted, passed, used (turns.lua).
-- For a drawn lottery during the sale it moves the turns on (advance_turns) before reading,
-- as a purchase would: a cheap, idempotent step, bounded per call.

--! include turns.lua

local meta = redis.call('HMGET', KEYS[1], 'id', 'registration_opens_at_ms', 'admission',
                        'claim_window_s', 'per_user_limit', 'starts_at_ms', 'ends_at_ms')
if not meta[1] then
  return {'not_found'}
end
local user = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local registered = 0
if meta[2] and redis.call('HEXISTS', KEYS[2], user) == 1 then
  registered = 1
end
local starts_ms, ends_ms = tonumber(meta[6]), tonumber(meta[7])
if now_ms >= ends_ms then
  return {'ended', registered, -1, -1, -1, 0, now_ms}
end
if now_ms < starts_ms then
  return {'upcoming', registered, -1, -1, starts_ms - now_ms, 0, now_ms}
end
if meta[3] ~= 'lottery' then
  return {'fcfs', registered, -1, -1, 0, 0, now_ms}
end
local claim_ms = tonumber(meta[4]) * 1000
local state = advance_turns(KEYS[4], KEYS[5], KEYS[6], now_ms, claim_ms, tonumber(meta[5]))
if not state then
  return {'undrawn', registered, -1, -1, 1000, 0, now_ms}
end
local status, position, claim_ends = turn_of(user, KEYS[3], KEYS[7], KEYS[5], state, now_ms,
                                             claim_ms)
if status == 'used' then
  position = tonumber(redis.call('HGET', KEYS[3], user))
end
if status == 'admitted' then
  return {status, registered, position, 0, 0, claim_ends, now_ms}
end
if status ~= 'waiting' then
  return {status, registered, position or -1, -1, -1, 0, now_ms}
end
-- waiting: positions not yet admitted ahead, and a rough time: the next window to close,
-- then one claim window per `open` claims ahead; unknown while nothing is on sale
local ahead = position - state[2] - 1
local eta = -1
local available = tonumber(redis.call('GET', KEYS[6]) or '0')
local lapse = next_lapse_ms(KEYS[5], now_ms, claim_ms)
if available > 0 and lapse then
  eta = lapse + math.floor(ahead / math.max(state[4], 1)) * claim_ms
end
return {status, registered, position, ahead, eta, 0, now_ms}
