-- dead_letter.lua: move one pending stream entry to its activity's dead-letter stream, in one
-- atomic step: the copy and the acknowledgement happen together or not at all.
--
-- KEYS[1] origin  stream  the orders or changes stream that holds the entry
-- KEYS[2] dead    stream  the activity's dead letters (origin fields + origin_stream,
--                         origin_id, reason, attempts)
-- ARGV[1] consumer group ("writers")
-- ARGV[2] entry id in KEYS[1]
-- ARGV[3] reason (one line)
-- ARGV[4] failed store attempts of the entry (0 when it was never tried)
--
-- Returns {"moved", dead letter id}, or {"not_pending"} when the group no longer holds the
-- entry (another writer stored it meanwhile): nothing is written then. An entry deleted from
-- the stream while pending is moved with its origin and reason only (field "missing" = 1).
-- Every check runs before the first write.

local origin_type = redis.call('TYPE', KEYS[1])['ok']
if origin_type ~= 'stream' then
  return {'not_pending'}
end
local dead_type = redis.call('TYPE', KEYS[2])['ok']
if dead_type ~= 'stream' and dead_type ~= 'none' then
  return redis.error_reply('WRONGTYPE dead-letter key is a ' .. dead_type)
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return {'not_pending'}
end

local fields = {}
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found == 1 then
  local original = found[1][2]
  for i = 1, #original, 2 do
    local name = original[i]
    -- the bookkeeping fields are ours: an entry carrying them would be misread on replay
    if name ~= 'origin_stream' and name ~= 'origin_id' and name ~= 'reason'
        and name ~= 'attempts' and name ~= 'missing' then
      fields[#fields + 1] = name
      fields[#fields + 1] = original[i + 1]
    end
  end
else
  fields[#fields + 1] = 'missing'
  fields[#fields + 1] = '1'
end
fields[#fields + 1] = 'origin_stream'
fields[#fields + 1] = KEYS[1]
fields[#fields + 1] = 'origin_id'
fields[#fields + 1] = ARGV[2]
fields[#fields + 1] = 'reason'
fields[#fields + 1] = ARGV[3]
fields[#fields + 1] = 'attempts'
fields[#fields + 1] = ARGV[4]

local dead_id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return {'moved', dead_id}
