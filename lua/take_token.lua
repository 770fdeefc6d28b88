-- take_token.lua: a token bucket in Redis (cluster-wide rate limits).
--
-- As a script:
--   KEYS[1] bucket  hash {tokens, at_ms}, expires when idle
--   ARGV[1] rate (tokens per second)  ARGV[2] burst  ARGV[3] cost
--   Returns {allowed (1|0), tokens left (floor), retry after ms}
-- The function above the "standalone" marker is also inlined into reserve_stock.lua, which
-- takes the per-user and per-IP tokens in the same atomic step as the purchase.

local function take_token(key, rate, burst, cost, now_ms)
  local state = redis.call('HMGET', key, 'tokens', 'at_ms')
  local tokens = tonumber(state[1])
  local at = tonumber(state[2])
  if tokens == nil or at == nil then
    tokens = burst
    at = now_ms
  end
  tokens = math.min(burst, tokens + math.max(0, now_ms - at) * rate / 1000)
  if tokens < cost then
    return 0, tokens, math.ceil((cost - tokens) * 1000 / rate)
  end
  tokens = tokens - cost
  redis.call('HSET', key, 'tokens', tokens, 'at_ms', now_ms)
  -- an idle bucket is full again after burst / rate seconds: it can go
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
  return 1, tokens, 0
end

--! standalone
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local allowed, left, retry = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]),
                                        tonumber(ARGV[3]), now_ms)
return {allowed, math.floor(left), retry}
