-- replication_fence.lua: which of the entries read are still on this node, and a write whose
-- replica acknowledgement covers them.
--
-- Replication is one ordered stream per primary: once a replica acknowledges this script's
-- write (the WAIT the coalescer sends after it on the same connection), it holds every entry
-- this node held when the script ran. The check that the entries are here matters after a
-- failover: the call may have been sent again to the promoted node, which never had an entry
-- the old primary gave the writer.
--
-- KEYS[1] fence   string  a counter of the key space (its hash tag), kept a day
-- KEYS[2] stream  stream  the orders or changes stream of that key space
-- ARGV    the ids of the entries read from it
--
-- Returns the ids of ARGV that the stream does not hold (the writer must not store them).
-- Reads first, then the one write.

local missing = {}
for _, id in ipairs(ARGV) do
  if #redis.call('XRANGE', KEYS[2], id, id, 'COUNT', 1) == 0 then
    missing[#missing + 1] = id
  end
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 86400)
return missing
