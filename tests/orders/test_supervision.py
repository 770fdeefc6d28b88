"""Background loops never end by accident, say whether they live, and expire on Redis time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from seckill import clock, keys
from seckill.activities import Activity
from seckill.orders.service import OrderService
from seckill.orders.store import open_store
from seckill.orders.supervisor import Supervisor, alive
from seckill.orders.sweeper import Sweeper
from seckill.scripts import Coalescer, Scripts
from seckill.settings import Settings
from seckill.stock import Outcome, Stock


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, max_connections=32)
    yield client
    await client.aclose()


@pytest.fixture
def stock(redis: Redis) -> Stock:
    return Stock(redis, Scripts.from_dir(), Coalescer(redis, max_batch=64, in_flight=2), 90_000)


async def _wait(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _activity(stock: Stock, activity_id: str, quantity: int, timeout_s: int = 900) -> None:
    now = clock.now_ms()
    await stock.put_activity(
        Activity(
            activity_id, "sku", "t", 100, quantity, 1, now - 60_000, now + 3_600_000, timeout_s
        )
    )


async def _buy(stock: Stock, activity_id: str, users: range) -> list[str]:
    results = await asyncio.gather(*(stock.reserve(activity_id, f"u{n}", "k", 1) for n in users))
    assert all(r.outcome is Outcome.OK for r in results), [r.outcome for r in results]
    return [r.order_id for r in results]


@contextlib.asynccontextmanager
async def _running(*coroutines: Callable[[asyncio.Event], Awaitable[None]]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run(stop)) for run in coroutines]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_a_crashing_loop_is_restarted_and_its_heartbeat_says_so(redis: Redis) -> None:
    """Invariant: a loop that raises runs again; the heartbeat exists only while it runs."""
    runs: list[float] = []
    release = asyncio.Event()

    async def flaky(stop: asyncio.Event) -> None:
        runs.append(time.monotonic())
        if len(runs) <= 3:
            raise RuntimeError(f"crash {len(runs)}")
        await release.wait()  # the fourth run stays up until the test lets it stop
        await stop.wait()

    supervisor = Supervisor(
        "flaky", flaky, redis, heartbeat_interval_s=0.1, heartbeat_ttl_s=2.0, backoff_initial_s=0.01
    )
    async with _running(supervisor.run):
        await _wait(lambda: _true(len(runs) >= 4), 20, "the fourth run")
        assert supervisor.restarts == 3
        await _wait(lambda: alive(redis, "flaky"), 20, "a heartbeat")
        assert supervisor.up
        release.set()
    # a clean stop takes the heartbeat down at once instead of letting it run out
    assert not await alive(redis, "flaky")
    assert not supervisor.up


async def test_a_loop_that_returns_by_itself_is_restarted(redis: Redis) -> None:
    """Invariant: only `stop` ends a supervised loop; returning early is a crash."""
    runs = 0

    async def quitter(stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs > 2:
            await stop.wait()

    supervisor = Supervisor("quitter", quitter, redis, backoff_initial_s=0.01)
    async with _running(supervisor.run):
        await _wait(lambda: _true(runs >= 3), 20, "a third run")
    assert supervisor.restarts == 2


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("skew_s", [5, -5])
async def test_the_sweeper_decides_due_by_redis_time(
    stock: Stock, redis: Redis, monkeypatch: pytest.MonkeyPatch, skew_s: int
) -> None:
    """Invariant: with this machine's clock ±5 s off, expiry follows Redis TIME and the sweeper
    calls release_stock.lua only for orders that are due."""
    real = clock.now_ms
    monkeypatch.setattr(clock, "now_ms", lambda: real() + skew_s * 1000)
    await _activity(stock, "skew", 20, timeout_s=1)
    orders = await _buy(stock, "skew", range(10))
    sweeper = Sweeper(stock)

    # at once: nothing is due by Redis's clock, so no script call at all
    assert await sweeper.sweep() == 0
    assert sweeper.stats.calls == 0

    seconds, micros = await redis.time()
    deadlines = [
        score for _, score in await redis.zrange(keys.deadlines("skew"), 0, -1, withscores=True)
    ]
    assert len(deadlines) == len(orders)
    redis_now = int(seconds) * 1000 + int(micros) // 1000
    assert max(deadlines) > redis_now, "the deadlines lie in Redis's future"

    async def all_expired() -> bool:
        await sweeper.sweep()
        return sweeper.stats.expired == len(orders)

    await _wait(all_expired, 30, "every order to expire")
    assert sweeper.stats.calls == len(orders), "one script call per order due, no more"


def _service_settings(settings: Settings) -> Settings:
    return settings.replace("writer", block_ms=50, retry_idle_ms=100, claim_idle_ms=1000).replace(
        "sweeper", interval_s=0.1
    )


async def _stored(store: Any, activity_id: str, count: int) -> bool:
    return bool(await store.count(activity_id) >= count)


@pytest.mark.parametrize(
    ("fault", "on", "off"),
    [
        ("NOREPLICAS", ("min-replicas-to-write", "1"), ("min-replicas-to-write", "0")),
        ("OOM|maxmemory", ("maxmemory", "1"), ("maxmemory", "0")),
    ],
)
async def test_writer_and_sweeper_carry_on_after_redis_error_replies(
    settings: Settings,
    redis: Redis,
    stock: Stock,
    tmp_path: Path,
    fault: str,
    on: tuple[str, str],
    off: tuple[str, str],
) -> None:
    """Invariant: 5 s of error replies to every write, then the writers' group deleted, and the
    writer and the sweeper go on by themselves: later orders reach the store, due reservations
    expire, and neither loop is ever reported down for good."""
    store = open_store(f"sqlite:///{tmp_path / 'orders.db'}")
    await store.migrate()
    service = OrderService(_service_settings(settings), redis, store)
    await _activity(stock, "faults", 100, timeout_s=1)
    try:
        async with _running(service.run):
            before = await _buy(stock, "faults", range(10))
            await _wait(lambda: _stored(store, "faults", 10), 30, "the first orders stored")

            await redis.config_set(*on)
            with pytest.raises(Exception, match=fault):
                await redis.set("probe", "1")
            await asyncio.sleep(5)  # the loops meet the error reply over and over
            await redis.config_set(*off)
            await redis.xgroup_destroy(keys.stream("faults"), "writers")

            after = await _buy(stock, "faults", range(10, 20))
            await _wait(lambda: _stored(store, "faults", 20), 30, "orders accepted after it")

            async def all_expired() -> bool:
                statuses = await store.statuses("faults")
                return all(statuses.get(o) == "expired" for o in before + after)

            await _wait(all_expired, 30, "every reservation to expire and reach the store")
            assert all(service.alive().values()), service.alive()
            assert await alive(redis, "writer") and await alive(redis, "sweeper")
    finally:
        await redis.config_set(*off)
        await store.close()
