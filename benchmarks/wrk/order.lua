-- wrk script: POST an order with a different user token and Idempotency-Key each request.
-- Environment: SECKILL_TOKENS (file of "Bearer <jwt>" lines), SECKILL_PATH (order URL path),
-- SECKILL_BODY (optional: the order body, default {"quantity": 1}), SECKILL_DEVICES ("1": an
-- X-Device-Id per token, as a mini program sends it).
local tokens = {}
local counter = 0
local thread_id = 0
local path = os.getenv("SECKILL_PATH")
local body = os.getenv("SECKILL_BODY") or '{"quantity": 1}'
local devices = os.getenv("SECKILL_DEVICES") == "1"

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end

function init(args)
  for line in io.lines(os.getenv("SECKILL_TOKENS")) do
    tokens[#tokens + 1] = line
  end
  counter = (tid or 1) * 1000003
end

function request()
  counter = counter + 1
  local headers = {
    ["Authorization"] = tokens[(counter % #tokens) + 1],
    ["Idempotency-Key"] = "bench-" .. counter,
    ["Content-Type"] = "application/json",
  }
  if devices then
    headers["X-Device-Id"] = "dev-" .. (counter % #tokens)
  end
  return wrk.format("POST", path, headers, body)
end

done = function(summary, latency, requests)
  local codes = {}
  io.write(string.format("errors connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
end
