-- risk_deny.lua: put a subject on the deny list or take it off, audit and announce it,
-- atomically.
--
-- KEYS[1] deny      hash    "<kind>:<subject hash>" -> JSON {"expires_at_ms" (null: none),
--                           "reason", "at_ms", "who"}
-- KEYS[2] expiries  zset    the same member -> expires_at_ms (entries with a TTL only)
-- KEYS[3] audit     stream  one entry per change (time, who, action, member, ttl, reason)
-- KEYS[4] version   string  bumped on every change: gateways re-read the list when it moves
-- ARGV[1] member "<kind>:<subject hash>"
-- ARGV[2] action: "put" or "delete"
-- ARGV[3] ttl, seconds ("" for none: until deleted)
-- ARGV[4] reason (may be "")
-- ARGV[5] who (for the audit)
-- ARGV[6] events channel
--
-- Returns for "put": {expires_at_ms or ""}; for "delete": {1 if the member was listed and
-- not expired, else 0}.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, action, ttl = ARGV[1], ARGV[2], ARGV[3]
if action ~= 'put' and action ~= 'delete' then
  return redis.error_reply('ERR risk_deny: action must be put or delete')
end
if ttl ~= '' and not (tonumber(ttl) and tonumber(ttl) >= 1) then
  return redis.error_reply('ERR risk_deny: malformed ttl')
end

-- expired entries are dead already (every reader compares the expiry); drop a few per change
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, 100)
for _, gone in ipairs(due) do
  redis.call('HDEL', KEYS[1], gone)
  redis.call('ZREM', KEYS[2], gone)
end

local answer
if action == 'put' then
  local expires_at = cjson.null
  if ttl ~= '' then
    expires_at = now_ms + tonumber(ttl) * 1000
    redis.call('ZADD', KEYS[2], expires_at, member)
  else
    redis.call('ZREM', KEYS[2], member)
  end
  redis.call('HSET', KEYS[1], member, cjson.encode(
    {expires_at_ms = expires_at, reason = ARGV[4], at_ms = now_ms, who = ARGV[5]}))
  answer = {expires_at == cjson.null and '' or tostring(expires_at)}
else
  local listed = 0
  local stored = redis.call('HGET', KEYS[1], member)
  if stored then
    local at = cjson.decode(stored)['expires_at_ms']
    listed = (at == cjson.null or tonumber(at) > now_ms) and 1 or 0
  end
  redis.call('HDEL', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
  answer = {listed}
end
redis.call('INCR', KEYS[4])
-- the audit keeps 90 days (trimmed by age; nothing reads it as a queue)
redis.call('XADD', KEYS[3], 'MINID', '~', tostring(now_ms - 90 * 86400000), '*',
  'at_ms', now_ms, 'who', ARGV[5], 'action', action, 'member', member, 'ttl_s', ttl,
  'reason', ARGV[4])
redis.call('PUBLISH', ARGV[6], 'risk:deny')
return answer
