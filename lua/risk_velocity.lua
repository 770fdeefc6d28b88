-- risk_velocity.lua: count one attempt of one subject (a user, a device or an IP) across
-- activities and say whether it went over the rule's rate.
--
-- KEYS[1] counter  hash {w = current window index, c = attempts in it, p = attempts in the
--                  window before}, under the subject's own hash tag (not an activity's):
--                  velocity spans activities, and on Redis Cluster each subject's counter
--                  lives in its own slot
-- ARGV[1] window, ms (>= 1000)
-- ARGV[2] most attempts per window (>= 1)
--
-- Returns {over (1|0), attempts in the sliding window (floor)}
--
-- A sliding window, approximated from two fixed ones: the previous window's count weighted by
-- the share of it still inside the sliding window, plus the current one. Every attempt counts,
-- refused ones included: a subject that keeps hammering stays over the rate.

local window = tonumber(ARGV[1])
local most = tonumber(ARGV[2])
if not (window and window >= 1000 and most and most >= 1) then
  return redis.error_reply('ERR risk_velocity: malformed window or max')
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index = math.floor(now_ms / window)
local state = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local stored = tonumber(state[1])
local current, previous = 0, 0
if stored == index then
  current, previous = tonumber(state[2]) or 0, tonumber(state[3]) or 0
elseif stored == index - 1 then
  previous = tonumber(state[2]) or 0
end
current = current + 1
local elapsed = (now_ms - index * window) / window
local attempts = previous * (1 - elapsed) + current
redis.call('HSET', KEYS[1], 'w', index, 'c', current, 'p', previous)
redis.call('PEXPIRE', KEYS[1], 2 * window)
return {attempts > most and 1 or 0, math.floor(attempts)}
