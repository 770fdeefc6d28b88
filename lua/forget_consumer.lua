-- forget_consumer.lua: remove a writer that is gone from the writers' group, only if it holds
-- nothing: XGROUP DELCONSUMER drops the consumer's pending entries with it, so the check and
-- the removal must be one step (a writer reading between the two would lose what it read).
--
-- KEYS[1] stream  an orders or changes stream
-- ARGV[1] consumer group ("writers")
-- ARGV[2] consumer name
-- ARGV[3] minimum idle time in ms (claim_idle_ms: a live writer reads far more often)
--
-- Returns 1 when the consumer was removed, 0 when it is absent, busy or holds entries.
-- Every check runs before the first write.

local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers['err'] then
  return 0  -- no such stream or group: nothing to forget
end
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do
    info[consumer[i]] = consumer[i + 1]
  end
  if info['name'] == ARGV[2] then
    if tonumber(info['pending']) > 0 or tonumber(info['idle']) < tonumber(ARGV[3]) then
      return 0
    end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 1
  end
end
return 0
