-- risk.lua: the risk rules that depend on purchase state, inlined (--! include) into the
-- scripts that sell or register, so a parallel burst cannot slip past a count.
--
-- Library (everything above the standalone marker):
--   risk_assess(devices_key, addresses_key, user, device, address_hash, pre, rules)
--     -> refused rule name or nil, hits {"<rule>:<mode>", ...}
--     Reads only. pre: the hits the gateway decided ("<rule>:<mode>,..."; deny list and
--     velocity); rules: {device_max, device_mode, address_max, address_mode} (max 0: off).
--   risk_record(devices_key, addresses_key, user, device, address_hash, expire_at_ms)
--     Writes; call it with the purchase's own writes, after every check passed.
--   risk_reply(reply, hits) -> reply, with {"risk", hit, ...} appended when there are hits
--     (the gateway counts and lists them, shadow ones included).
--
-- devices_key   set   users who bought with one device in one activity
-- addresses_key hash  keyed address hash -> orders created with it in one activity
-- Modes: "enforce" refuses, "shadow" only reports the hit.

local function risk_assess(devices_key, addresses_key, user, device, address_hash, pre, rules)
  local hits = {}
  local refused = nil
  local function hit(rule, mode)
    hits[#hits + 1] = rule .. ':' .. mode
    if refused == nil and mode == 'enforce' then
      refused = rule
    end
  end
  for entry in string.gmatch(pre or '', '[^,]+') do
    local rule, mode = string.match(entry, '^([%w_]+):(%a+)$')
    if rule then
      hit(rule, mode)
    end
  end
  local device_max = tonumber(rules[1]) or 0
  if device ~= '' and device_max > 0 and redis.call('SISMEMBER', devices_key, user) == 0
      and redis.call('SCARD', devices_key) >= device_max then
    hit('device_accounts', rules[2])
  end
  local address_max = tonumber(rules[3]) or 0
  if address_hash ~= '' and address_max > 0
      and tonumber(redis.call('HGET', addresses_key, address_hash) or '0') >= address_max then
    hit('address_orders', rules[4])
  end
  return refused, hits
end

local function risk_record(devices_key, addresses_key, user, device, address_hash, expire_at_ms)
  -- recorded whatever the rules' modes: a rule switched on mid-sale counts from the start
  if device ~= '' then
    redis.call('SADD', devices_key, user)
    redis.call('PEXPIREAT', devices_key, expire_at_ms)
  end
  if address_hash ~= '' then
    redis.call('HINCRBY', addresses_key, address_hash, 1)
    redis.call('PEXPIREAT', addresses_key, expire_at_ms)
  end
end

local function risk_reply(reply, hits)
  if hits and #hits > 0 then
    local tail = {'risk'}
    for _, entry in ipairs(hits) do
      tail[#tail + 1] = entry
    end
    reply[#reply + 1] = tail
  end
  return reply
end

--! standalone
return redis.error_reply('ERR risk.lua is a library: include it, do not run it')
