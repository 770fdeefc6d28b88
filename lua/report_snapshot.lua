-- report_snapshot.lua: one atomic reading of everything the invariant report compares, so its
-- counters, stock, holders, order records and stream backlogs belong to the same instant.
--
-- KEYS[1] counters  hash    orders_created, reserved, paid, released
-- KEYS[2] stock     string  quantity on sale
-- KEYS[3] holders   hash    user id -> quantity held in live orders
-- KEYS[4] orders    hash    order id -> msgpack record (live and not yet retired ones)
-- KEYS[5] stream    stream  accepted orders for the writers (field "o")
-- KEYS[6] changes   stream  transitions and payment events for the writers (field "c")
-- KEYS[7] dead      stream  dead letters of the activity
-- KEYS[8] skus      hash    SKU id -> quantity on sale (optional; absent before SKUs)
-- ARGV[1] writers' consumer group name
-- ARGV[2] most pending entries whose order ids are returned (pending is bounded by writers x
--         batch size; beyond this the reading says so)
-- ARGV[3] most entries counted one by one when the group cannot count its lag (after an AOF
--         replay or a promotion); beyond it the backlog is "at least" this many
-- ARGV[4] "full", or "positions" (only the groups' positions, to see whether writers moved)
-- ARGV[5] most order records (and holders) returned; past it neither is read, so a report
--         on a huge sale never blocks Redis (the per-order checks are then skipped)
--
-- Returns, for "positions": {orders position, changes position}
-- and for "full": {now_ms, counters, stock, holders, orders, orders stream, changes stream,
-- dead-letter count, number of order records in Redis, SKU stock (flat)}, where holders and
-- orders are empty when there are more records than ARGV[5], and a stream is
-- {position, pending, undelivered (-1: unknown), undelivered lower bound, max deleted id,
--  last delivered id (with no group: the first entry's id), pending entries {entry id, order id ("" once the entry is gone)},
--  pending count truncated (0/1)}
-- and a position is "<last delivered id>/<entries read>" ("" when there is no group).
-- Read-only: it writes nothing.

local group_name = ARGV[1]
local pending_cap = tonumber(ARGV[2])
local tail_cap = tonumber(ARGV[3])

local function as_map(flat)
  local map = {}
  for i = 1, #flat, 2 do
    map[flat[i]] = flat[i + 1]
  end
  return map
end

local function group_of(key)
  if redis.call('EXISTS', key) == 0 then
    return nil
  end
  for _, raw in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local group = as_map(raw)
    if group['name'] == group_name then
      return group
    end
  end
  return nil
end

local function position(group)
  if not group then
    return ''
  end
  return tostring(group['last-delivered-id']) .. '/' .. tostring(group['entries-read'])
end

if ARGV[4] == 'positions' then
  return {position(group_of(KEYS[5])), position(group_of(KEYS[6]))}
end

local function order_id_of(field, value)
  local ok, decoded = pcall(cmsgpack.unpack, value)
  if not ok or type(decoded) ~= 'table' then
    return '?'
  end
  if field == 'o' then
    return tostring(decoded['order_id'])
  end
  if decoded['kind'] == 'transition' and type(decoded['order']) == 'table' then
    return tostring(decoded['order']['order_id'])
  end
  return tostring(decoded['order_id'])
end

local function stream_state(key, field)
  if redis.call('EXISTS', key) == 0 then
    return {'', 0, 0, 0, '0-0', '0-0', {}, 0}
  end
  local info = as_map(redis.call('XINFO', 'STREAM', key))
  local max_deleted = tostring(info['max-deleted-entry-id'])
  local group = group_of(key)
  if not group then
    -- no group (no writer started yet, or the group was lost): every entry is undelivered;
    -- the first one's id stands in for the last delivered (the reader takes what is below it)
    local length = redis.call('XLEN', key)
    local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
    local first_id = '0-0'
    if #first > 0 then
      first_id = first[1][1]
    end
    return {'', 0, length, length, max_deleted, first_id, {}, 0}
  end
  local last = tostring(group['last-delivered-id'])
  local undelivered = -1
  local lower = 0
  if group['lag'] then
    undelivered = tonumber(group['lag'])
  elseif group['entries-read'] then
    -- counts entries deleted after the last delivery too; those are reported on their own
    undelivered = tonumber(info['entries-added']) - tonumber(group['entries-read'])
  else
    local following = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', tail_cap + 1)
    lower = #following
    if #following <= tail_cap then
      undelivered = #following
    end
  end
  if undelivered >= 0 then
    lower = undelivered
  end
  local pending_count = tonumber(group['pending'])
  local entries = {}
  if pending_count > 0 then
    for _, p in ipairs(redis.call('XPENDING', key, group_name, '-', '+', pending_cap)) do
      local found = redis.call('XRANGE', key, p[1], p[1])
      local order_id = ''
      if #found > 0 then
        local fields = as_map(found[1][2])
        order_id = order_id_of(field, fields[field] or '')
      end
      table.insert(entries, {p[1], order_id})
    end
  end
  local truncated = 0
  if pending_count > #entries then
    truncated = 1
  end
  return {position(group), pending_count, undelivered, lower, max_deleted, last, entries,
          truncated}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local record_count = redis.call('HLEN', KEYS[4])
local holders, records = {}, {}
if record_count <= tonumber(ARGV[5]) then
  holders = redis.call('HGETALL', KEYS[3])
  records = redis.call('HGETALL', KEYS[4])
end
return {
  now_ms,
  redis.call('HGETALL', KEYS[1]),
  redis.call('GET', KEYS[2]) or '0',
  holders,
  records,
  stream_state(KEYS[5], 'o'),
  stream_state(KEYS[6], 'c'),
  redis.call('XLEN', KEYS[7]),
  record_count,
  KEYS[8] and redis.call('HGETALL', KEYS[8]) or {},
}
