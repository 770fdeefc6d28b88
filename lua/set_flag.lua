-- set_flag.lua: change a degradation flag, audit it and announce it, atomically.
--
-- KEYS[1] flags   hash    name -> JSON value
-- KEYS[2] meta    hash    name -> JSON {"previous": <json>, "expires_at_ms": int|null}
-- KEYS[3] audit   stream  one entry per change (time, who, name, old, new, ttl)
-- ARGV[1] name
-- ARGV[2] new value (JSON)
-- ARGV[3] ttl seconds ("" for none): the flag returns to its previous value afterwards
-- ARGV[4] who (for the audit)
-- ARGV[5] default value (JSON) when the flag was never set
-- ARGV[6] events channel
-- ARGV[7] mode: "set", or "revert" (only if the expiry recorded in meta has passed)
--
-- Returns {old_json, expires_at_ms or ""} or {"not_due"} for a revert that is not (yet) due.

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local old = redis.call('HGET', KEYS[1], ARGV[1]) or ARGV[5]
local new = ARGV[2]
local ttl = ARGV[3]
local who = ARGV[4]

if ARGV[7] == 'revert' then
  local meta = redis.call('HGET', KEYS[2], ARGV[1])
  if not meta then
    return {'not_due'}
  end
  local decoded = cjson.decode(meta)
  if decoded['expires_at_ms'] == cjson.null or tonumber(decoded['expires_at_ms']) > now_ms then
    return {'not_due'}
  end
  new = cjson.encode(decoded['previous'])
  ttl = ''
  who = 'ttl-expiry'
end

local expires_at = ''
if ttl ~= '' then
  expires_at = now_ms + tonumber(ttl) * 1000
  redis.call('HSET', KEYS[2], ARGV[1],
    '{"previous":' .. old .. ',"expires_at_ms":' .. expires_at .. '}')
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], new)
-- the audit keeps 90 days (trimmed by age; nothing reads it as a queue)
redis.call('XADD', KEYS[3], 'MINID', '~', tostring(now_ms - 90 * 86400000), '*',
  'at_ms', now_ms, 'who', who, 'name', ARGV[1], 'old', old, 'new', new, 'ttl_s', ttl)
redis.call('PUBLISH', ARGV[6], 'flags:' .. ARGV[1])
return {old, tostring(expires_at)}
