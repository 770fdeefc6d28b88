-- risk_velocity.lua: count one attempt of each subject given (a user, a device, an IP) across
-- activities, and say for each whether it went over its rule's rate.
--
-- KEYS[i]         counter  hash {w = current window index, c = attempts in it, p = attempts in
--                          the window before}, under the subject's own hash tag (not an
--                          activity's): velocity spans activities. On Redis Cluster each
--                          subject's counter lives in a slot of its own, and the caller sends
--                          one call per subject; on one Redis, one call carries them all.
-- ARGV[2i - 1]    window of KEYS[i], ms (>= 1000)
-- ARGV[2i]        most attempts per window of KEYS[i] (>= 1)
--
-- Returns {over_1 (1|0), attempts_1 (floor), over_2, attempts_2, ...}, in KEYS order.
--
-- A sliding window, approximated from two fixed ones: the previous window's count weighted by
-- the share of it still inside the sliding window, plus the current one. Every attempt counts,
-- refused ones included: a subject that keeps hammering stays over the rate.
--
-- Library (above the standalone marker; reserve_stock.lua inlines it to count a purchase
-- attempt in the purchase's own step on one Redis, saving a round trip):
--   velocity_count(key, window_ms, most, now_ms) -> over (bool), attempts (floor)

local function velocity_count(key, window, most, now_ms)
  local index = math.floor(now_ms / window)
  local state = redis.call('HMGET', key, 'w', 'c', 'p')
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
  redis.call('HSET', key, 'w', index, 'c', current, 'p', previous)
  redis.call('PEXPIRE', key, 2 * window)
  return attempts > most, math.floor(attempts)
end

--! standalone
for i = 1, #KEYS do
  local window, most = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if not (window and window >= 1000 and most and most >= 1) then
    return redis.error_reply('ERR risk_velocity: malformed window or max for key ' .. i)
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local answer = {}
for i, key in ipairs(KEYS) do
  local over, attempts = velocity_count(key, tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]),
                                        now_ms)
  answer[#answer + 1] = over and 1 or 0
  answer[#answer + 1] = attempts
end
return answer
