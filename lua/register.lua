-- register.lua: register a user for a sale with a registration window, once.
--
-- KEYS[1] meta         hash  activity definition (registration_opens_at_ms, starts_at_ms)
-- KEYS[2] registrants  hash  user -> "<seq>|<device id>|<registered at ms>"
-- KEYS[3] order        list  user ids in registration order (what the draw reads and the
--                            admin API exports)
-- KEYS[4] devices      hash  device id -> accounts registered with it for this activity
-- ARGV[1] user id
-- ARGV[2] device id, as the gateway keeps it (a keyed hash; "" none)
-- Risk rules (lua/risk.lua), optional, from the bases RISK_KEYS and RISK_ARGV as in
-- reserve_stock.lua: KEYS[RISK_KEYS + 0..1] devices, addresses; ARGV[RISK_ARGV + 0..5] the
-- gateway's hits, the device hash, accounts-per-device most and mode, orders-per-address most
-- and mode. The accounts-per-device rule counts the accounts that registered (or bought) with
-- the device in this activity.
--
-- Returns {"created", seq, accounts on the device} | {"registered", seq} (already registered:
-- an idempotent repeat, answered whatever the time) | {"closed"} (outside
-- [registration_opens_at, starts_at), or the activity takes no registrations) |
-- {"risk_refused", rule} | {"not_found"}; answers decided after the risk rules end with
-- {"risk", "<rule>:<mode>", ...} when a rule hit (risk_reply).
-- Every check runs before the first write.

--! include risk.lua

local RISK_KEYS = 5
local RISK_ARGV = 3

local meta = redis.call('HMGET', KEYS[1], 'id', 'registration_opens_at_ms', 'starts_at_ms',
                        'ends_at_ms')
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
-- risk rules before the first write, so that parallel registrations cannot slip past a count
local risk_on = KEYS[RISK_KEYS + 1] ~= nil
local risk_hits = {}
if risk_on then
  local refused
  refused, risk_hits = risk_assess(
    KEYS[RISK_KEYS + 0], KEYS[RISK_KEYS + 1], user, device, '', ARGV[RISK_ARGV + 0],
    {ARGV[RISK_ARGV + 2], ARGV[RISK_ARGV + 3], ARGV[RISK_ARGV + 4], ARGV[RISK_ARGV + 5]})
  if refused then
    return risk_reply({'risk_refused', refused}, risk_hits)
  end
end

local seq = redis.call('RPUSH', KEYS[3], user)
redis.call('HSET', KEYS[2], user, seq .. '|' .. device .. '|' .. now_ms)
local accounts = 0
if device ~= '' then
  accounts = redis.call('HINCRBY', KEYS[4], device, 1)
end
if risk_on then
  -- kept a day past the sale's end, as the purchase keeps it
  risk_record(KEYS[RISK_KEYS + 0], KEYS[RISK_KEYS + 1], user, device, '',
              tonumber(meta[4]) + 86400000)
end
return risk_reply({'created', seq, accounts}, risk_hits)
