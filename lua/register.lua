-- register.lua: register a user for a sale with a registration window, once.
--
-- KEYS[1] meta         hash  activity definition (registration_opens_at_ms, starts_at_ms)
-- KEYS[2] registrants  hash  user -> "<seq>|<device id>|<registered at ms>"
-- KEYS[3] order        list  user ids in registration order (what the draw reads and the
--                            admin API exports)
-- KEYS[4] devices      hash  device id -> accounts registered with it for this activity
-- ARGV[1] user id
-- ARGV[2] device id ("" none)
--
-- Returns {"created", seq, accounts on the device} | {"registered", seq} (already registered:
-- an idempotent repeat, answered whatever the time) | {"closed"} (outside
-- [registration_opens_at, starts_at), or the activity takes no registrations) | {"not_found"}.
-- Every check runs before the first write.

local meta = redis.call('HMGET', KEYS[1], 'id', 'registration_opens_at_ms', 'starts_at_ms')
if not meta[1] then
  return {'not_found'}
end
local user = ARGV[1]
local device = ARGV[2]
local existing = redis.call('HGET', KEYS[2], user)
if existing then
  return {'registered', tonumber(string.match(existing, '^(%d+)'))}
end
if not meta[2] then
  return {'closed'}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now_ms < tonumber(meta[2]) or now_ms >= tonumber(meta[3]) then
  return {'closed'}
end
-- part B's rule "accounts per device per activity" checks HGET KEYS[4] device here, before the
-- first write, so that parallel registrations cannot slip past its count

local seq = redis.call('RPUSH', KEYS[3], user)
redis.call('HSET', KEYS[2], user, seq .. '|' .. device .. '|' .. now_ms)
local accounts = 0
if device ~= '' then
  accounts = redis.call('HINCRBY', KEYS[4], device, 1)
end
return {'created', seq, accounts}
