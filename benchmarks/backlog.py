"""What reading the backlog costs with 10 vs 1,000,000 entries waiting (a nil lag included).

The report and the writer's metrics read each stream's backlog every few seconds; after an
AOF replay, a promotion or an XDEL the group's ``lag`` is nil, and reading "everything after
the last delivery" would block Redis for seconds with a million entries waiting. This measures
``streams.backlog`` and ``streams.oldest_waiting_ms`` on a redis-server of its own, with the
lag known and with the lag nil, and prints the cost ratio large/small (1.0 = O(1)).

    python benchmarks/backlog.py [--large 1000000] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
from redis.asyncio import Redis

from seckill.embedded import EmbeddedRedis
from seckill.orders.streams import backlog, ensure_group, oldest_waiting_ms

# XADDs in the server, in chunks (one EVAL per chunk, not one round trip per entry)
_FILL = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('XADD', KEYS[1], '*', 'o', ARGV[2])
end
return redis.call('XLEN', KEYS[1])
"""

_PAYLOAD: bytes = msgpack.packb(
    {
        "order_id": "bench." + "0" * 20,
        "activity_id": "bench",
        "user_id": "user-000000",
        "quantity": 1,
        "status": "reserved",
        "created_at": 1_700_000_000_000,
        "expires_at": 1_700_000_900_000,
        "paid_at": 0,
    }
)


async def _fill(client: Redis, stream: str, count: int) -> None:
    await ensure_group(client, stream)
    left = count
    while left > 0:
        chunk = min(left, 50_000)
        await client.eval(_FILL, 1, stream, chunk, _PAYLOAD)  # type: ignore[misc]
        left -= chunk


async def _nil_lag(client: Redis, stream: str) -> None:
    """Make Redis lose the group's lag: delete one entry after the last delivery."""
    middle: Any = await client.xrange(stream, count=3)
    await client.xdel(stream, middle[-1][0])
    groups: Any = await client.xinfo_groups(stream)
    assert groups[0]["lag"] is None


async def _cost_us(client: Redis, stream: str, rounds: int) -> tuple[float, float]:
    """Median microseconds of one backlog() and one oldest_waiting_ms()."""
    backlog_us: list[float] = []
    oldest_us: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        await backlog(client, stream)
        backlog_us.append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        await oldest_waiting_ms(client, stream)
        oldest_us.append((time.perf_counter() - start) * 1e6)
    return statistics.median(backlog_us), statistics.median(oldest_us)


async def measure(large: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        server = EmbeddedRedis(Path(directory), appendfsync="no")
        server.start()
        client = Redis.from_url(server.url)
        try:
            sizes = {"small": 10, "large": large}
            results: dict[tuple[str, str], tuple[float, float]] = {}
            for label, count in sizes.items():
                stream = f"sk:{{a:bench-{label}}}:stream"
                await _fill(client, stream, count)
                results[label, "lag known"] = await _cost_us(client, stream, rounds)
                await _nil_lag(client, stream)
                waiting = await backlog(client, stream)
                print(
                    f"{label}: {count:>9,} waiting; nil lag reads as"
                    f" {'>= ' if waiting.at_least else ''}{waiting.undelivered:,}"
                )
                results[label, "lag nil"] = await _cost_us(client, stream, rounds)
            print(f"\n{'case':<12}{'entries':>10}{'backlog µs':>14}{'oldest µs':>12}")
            for (label, case), (b_us, o_us) in results.items():
                print(f"{case:<12}{sizes[label]:>10,}{b_us:>14.1f}{o_us:>12.1f}")
            for case in ("lag known", "lag nil"):
                b_ratio = results["large", case][0] / results["small", case][0]
                o_ratio = results["large", case][1] / results["small", case][1]
                print(f"ratio {large:,}/10, {case}: backlog {b_ratio:.2f}x, oldest {o_ratio:.2f}x")
        finally:
            await client.aclose()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", type=int, default=1_000_000, help="entries waiting")
    parser.add_argument("--rounds", type=int, default=200, help="readings per case")
    args = parser.parse_args()
    asyncio.run(measure(args.large, args.rounds))


if __name__ == "__main__":
    main()
