-- turns.lua: registration and turns of a fair sale, inlined ("--! include turns.lua") into
-- reserve_stock.lua, release_stock.lua, install_draw.lua and queue_position.lua.
--
-- Keys (all under the activity's hash tag, built by seckill/keys.py):
--   registrants  hash  user -> "<seq>|<device id>|<registered at ms>" (register.lua)
--   positions    hash  user -> position in the lottery order, 1..n (written once, atomically,
--                      by install_draw.lua: a RENAME of a fully written staging hash)
--   turns        hash  n     positions drawn (absent: no draw yet)
--                      p     positions 1..p have been admitted
--                      l     positions 1..l have had their claim window close, and were counted
--                      open  admitted users whose claim is still open and unused
--                      b<e>  claims used in the batch that ends at position e
--   batches      zset  "<e>:<admitted at ms>" scored e: one admission step admits the positions
--                      (previous e, e] at one instant, so one entry times the whole batch;
--                      only batches whose window is still open are kept
--   claims       hash  user -> the order id that used their turn (one purchase per turn)
--
-- Why it is O(1) per request: a turn is a claim on `unit` units (the activity's
-- per_user_limit), and admission keeps exactly enough open claims to cover what is on sale:
--     open * unit >= available stock   (while positions remain)
-- advance_turns (1) closes the batches whose claim window has passed, oldest first (their
-- unused claims, size - b<e>, leave `open`; l moves to e), then (2) admits
-- ceil((available - open * unit) / unit) more positions as one new batch. A purchase uses its
-- buyer's claim (open - 1, b<e> + 1, claims[user]); a cancel or expiry puts stock back and
-- advances at once, so returned units admit the next positions and nobody else: a user outside
-- (l, p] never buys, however fast they call. Each step reads a handful of fields and the
-- oldest batch; nothing scans the registrants.

-- "<e>:<at ms>" -> e, at
local function turn_batch(member)
  local last, at = string.match(member, '^(%d+):(%d+)$')
  return tonumber(last), tonumber(at)
end

-- {n, p, l, open} of a drawn activity, or nil before the draw
local function turn_state(turns)
  local state = redis.call('HMGET', turns, 'n', 'p', 'l', 'open')
  if not state[1] then
    return nil
  end
  return {tonumber(state[1]), tonumber(state[2]), tonumber(state[3]), tonumber(state[4])}
end

-- Close lapsed batches and admit what the stock on sale allows; {n, p, l, open}, or nil
-- before the draw. Idempotent in time: whoever calls it at a given moment gets the same state.
local function advance_turns(turns, batches, stock, now_ms, claim_ms, unit)
  local state = turn_state(turns)
  if not state then
    return nil
  end
  local n, p, l, open = state[1], state[2], state[3], state[4]
  local changed = false
  -- bounded per call; the rest is closed by the next call
  for _ = 1, 64 do
    local oldest = redis.call('ZRANGE', batches, 0, 0)
    if #oldest == 0 then
      break
    end
    local last, at = turn_batch(oldest[1])
    if at + claim_ms > now_ms then
      break
    end
    local used = tonumber(redis.call('HGET', turns, 'b' .. last) or '0')
    open = open - (last - l - used)
    l = last
    redis.call('HDEL', turns, 'b' .. last)
    redis.call('ZREM', batches, oldest[1])
    changed = true
  end
  if p < n then
    local short = tonumber(redis.call('GET', stock) or '0') - open * unit
    if short > 0 then
      local admitted = math.min(math.ceil(short / unit), n - p)
      p = p + admitted
      open = open + admitted
      redis.call('ZADD', batches, p, p .. ':' .. now_ms)
      changed = true
    end
  end
  if changed then
    redis.call('HSET', turns, 'p', p, 'l', l, 'open', open)
  end
  return {n, p, l, open}
end

-- Where the user stands in a drawn sale (reads only):
--   'used'                                     their turn bought an order already
--   'unplaced'                                 no position (never registered)
--   'passed', position                         their claim window closed unused
--   'waiting', position                        not admitted yet
--   'admitted', position, claim ends ms, e     may buy now; e ends their batch
local function turn_of(user, positions, claims, batches, state, now_ms, claim_ms)
  if redis.call('HEXISTS', claims, user) == 1 then
    return 'used'
  end
  local raw = redis.call('HGET', positions, user)
  if not raw then
    return 'unplaced'
  end
  local position = tonumber(raw)
  if position <= state[3] then
    return 'passed', position
  end
  if position > state[2] then
    return 'waiting', position
  end
  local batch = redis.call('ZRANGEBYSCORE', batches, position, '+inf', 'LIMIT', 0, 1)
  if #batch == 0 then
    return 'passed', position
  end
  local last, at = turn_batch(batch[1])
  if at + claim_ms <= now_ms then
    return 'passed', position
  end
  return 'admitted', position, at + claim_ms, last
end

-- Milliseconds until the oldest open claim window closes (when turns move on without any
-- returned stock), or nil when none is open.
local function next_lapse_ms(batches, now_ms, claim_ms)
  local oldest = redis.call('ZRANGE', batches, 0, 0)
  if #oldest == 0 then
    return nil
  end
  local _, at = turn_batch(oldest[1])
  return math.max(0, at + claim_ms - now_ms)
end

-- The order POST's registration and turn check, after switches and before rate limits.
-- k: {registrants, positions, turns, batches, claims, stock}; fair: {opens_at_ms, admission,
-- claim_ms, unit, starts_ms, ends_ms}. Returns nil, batch end (nil for fcfs) when the buyer
-- may go on; else a refusal {code, retry ms, why}. Its only write is advance_turns, and only
-- for a buyer not yet admitted: moving the turns on is time's outcome, the same whoever calls,
-- never half a purchase.
local function check_turn(k, user, fair, now_ms)
  if redis.call('HEXISTS', k.registrants, user) == 0 then
    return {'not_registered'}
  end
  -- outside the sale there are no turns: the window check answers not_started / ended
  if fair.admission ~= 'lottery' or now_ms < fair.starts_ms or now_ms >= fair.ends_ms then
    return nil
  end
  local state = turn_state(k.turns)
  if not state then
    return {'undrawn', 1000, 'draw'}
  end
  local status, position, _, last = turn_of(user, k.positions, k.claims, k.batches, state,
                                            now_ms, fair.claim_ms)
  if status == 'waiting' then
    state = advance_turns(k.turns, k.batches, k.stock, now_ms, fair.claim_ms, fair.unit)
    status, position, _, last = turn_of(user, k.positions, k.claims, k.batches, state, now_ms,
                                        fair.claim_ms)
  end
  if status == 'admitted' then
    return nil, last
  end
  if status == 'waiting' then
    local retry = next_lapse_ms(k.batches, now_ms, fair.claim_ms) or fair.claim_ms
    return {'not_your_turn', math.min(retry, fair.ends_ms - now_ms), 'waiting'}
  end
  -- used, passed (or unplaced): nothing changes for this user before the sale ends
  return {'not_your_turn', fair.ends_ms - now_ms, status}
end

-- A purchase that passed check_turn with batch end `last` uses its buyer's turn.
local function use_turn(k, user, order_id, last)
  redis.call('HSET', k.claims, user, order_id)
  redis.call('HINCRBY', k.turns, 'b' .. last, 1)
  redis.call('HINCRBY', k.turns, 'open', -1)
end

--! standalone
return 'turns.lua is a library: inline it with --! include turns.lua'
