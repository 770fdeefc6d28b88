"""A Redis restart with a million orders waiting: does the writer write at its rate at once?

    python benchmarks/restart_backlog.py [--waiting 1000000] [--rate 5000] [--seconds 10]

Fills an activity's orders stream with ``--waiting`` accepted orders (in the server, by Lua)
that no writer has read, restarts redis-server so that it replays its AOF (after which the
group's ``lag`` is nil: the case that made the old writer read the whole tail every second and
write nothing), then starts one writer capped at ``--rate`` rows/s on a fresh SQLite store and
prints the rows stored after each second, and what one backlog reading cost before and after
the restart. One entry is deleted after the restart so that the group's lag is nil, as after a
promotion.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from seckill import keys  # noqa: E402
from seckill.embedded import EmbeddedRedis  # noqa: E402
from seckill.orders.store import open_store  # noqa: E402
from seckill.orders.streams import backlog, ensure_group  # noqa: E402
from seckill.orders.writer import Writer, WriterConfig  # noqa: E402

ACTIVITY = "restart"

# accepted orders, each with its own id, as reserve_stock.lua would have written them
_FILL = """
local now = tonumber(ARGV[3])
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  redis.call('XADD', KEYS[1], '*', 'o', cmsgpack.pack({
    order_id = ARGV[4] .. '.' .. string.format('%020x', i), activity_id = ARGV[4],
    user_id = 'u' .. i, quantity = 1, status = 'reserved', created_at = now,
    expires_at = now + 900000, paid_at = 0,
  }))
end
return redis.call('XLEN', KEYS[1])
"""


async def _backlog_us(client: Redis, rounds: int = 50) -> tuple[float, int, bool]:
    started = time.perf_counter()
    for _ in range(rounds):
        reading = await backlog(client, keys.stream(ACTIVITY))
    cost = (time.perf_counter() - started) / rounds * 1e6
    return cost, reading.total, reading.at_least


async def run(waiting: int, rate: float, seconds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="seckill-restart-"))
    redis = EmbeddedRedis(work / "redis", appendfsync="everysec", maxmemory="4gb")
    url = redis.start()
    client = Redis.from_url(url)
    stream = keys.stream(ACTIVITY)
    await ensure_group(client, stream)
    await client.sadd(keys.ACTIVITIES, ACTIVITY)
    now_ms = int(time.time() * 1000)
    filled = time.perf_counter()
    for first in range(0, waiting, 50_000):
        last = min(first + 50_000, waiting) - 1
        await client.eval(_FILL, 1, stream, first, last, now_ms, ACTIVITY)  # type: ignore[misc]
    print(f"filled {waiting:,} waiting orders in {time.perf_counter() - filled:.1f}s")
    before = await _backlog_us(client)
    await client.aclose()

    restarted = time.perf_counter()
    redis.stop()
    url = redis.start(timeout_s=300)
    print(f"redis-server restarted (AOF replayed) in {time.perf_counter() - restarted:.1f}s")
    client = Redis.from_url(url)
    # as after a promotion: Redis cannot count the group's lag any more (an entry after the last
    # delivery is gone), so a backlog reading must not fall back to reading the tail
    newest = await client.xrevrange(stream, count=1)
    await client.xdel(stream, newest[0][0])
    waiting -= 1
    after = await _backlog_us(client)
    for label, (cost, total, at_least) in (("before", before), ("after", after)):
        shown = f">= {total:,}" if at_least else f"{total:,}"
        print(f"backlog reading {label} the restart: {cost:,.0f} µs, backlog {shown}")

    store = open_store(f"sqlite:///{work / 'orders.db'}")
    await store.migrate()
    writer = Writer(
        client, store, WriterConfig(max_rows_per_s=rate, batch_size=500), consumer="restart"
    )
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    started = time.monotonic()
    previous = 0
    print(f"writer capped at {rate:,.0f} rows/s:")
    for second in range(1, seconds + 1):
        await asyncio.sleep(max(0.0, started + second - time.monotonic()))
        stored = await store.count(ACTIVITY)
        print(f"  after {second:>2}s: {stored:>8,} stored ({stored - previous:,} in that second)")
        previous = stored
    stop.set()
    await task
    await store.close()
    await client.aclose()
    redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waiting", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(run(args.waiting, args.rate, args.seconds))


if __name__ == "__main__":
    main()
