-- unbind_payment_event.lua: free an event id whose callback was refused before anything was
-- stored (unknown order, wrong amount), so a corrected callback may use it; compare-and-delete.
--
-- KEYS[1] binding  string  "<order id> <payload hash>" (keys.payment_binding)
-- ARGV[1] the binding this caller set
--
-- Returns 1 when the binding was removed, 0 when it holds another value (or none).

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
