-- replay_dead_letter.lua: put one dead letter back on the stream it came from, as a new entry
-- (a new id, so the writers' group delivers it again), and remove it from the dead letters,
-- in one atomic step.
--
-- KEYS[1] dead    stream  the activity's dead letters
-- KEYS[2] origin  stream  the stream the dead letter names in its origin_stream field
-- ARGV[1] dead letter id in KEYS[1]
--
-- Returns {"replayed", new entry id in KEYS[2]}, or {code} with code in not_found (no such
-- dead letter), wrong_origin (KEYS[2] is not its origin), no_payload (the entry had been
-- deleted from its stream: nothing to replay). Every check runs before the first write.

local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return {'not_found'}
end
local origin_type = redis.call('TYPE', KEYS[2])['ok']
if origin_type ~= 'stream' and origin_type ~= 'none' then
  return redis.error_reply('WRONGTYPE origin key is a ' .. origin_type)
end
local original = found[1][2]
local fields = {}
local origin = nil
local missing = false
for i = 1, #original, 2 do
  local name = original[i]
  if name == 'origin_stream' then
    origin = original[i + 1]
  elseif name == 'missing' then
    missing = true
  elseif name ~= 'origin_id' and name ~= 'reason' and name ~= 'attempts' then
    fields[#fields + 1] = name
    fields[#fields + 1] = original[i + 1]
  end
end
if origin ~= KEYS[2] then
  return {'wrong_origin'}
end
if missing or #fields == 0 then
  return {'no_payload'}
end

local new_id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return {'replayed', new_id}
