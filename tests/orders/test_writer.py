"""The order writer: every accepted order reaches the store exactly once, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from seckill import keys
from seckill.activities import Activity
from seckill.embedded import free_port
from seckill.orders.store import OrderStore, open_store
from seckill.orders.streams import GROUP, backlog, trim_persisted
from seckill.orders.writer import Writer, WriterConfig
from seckill.scripts import Coalescer, Scripts
from seckill.stock import Outcome, Stock


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, max_connections=32)
    yield client
    await client.aclose()


@pytest.fixture
def stock(redis: Redis) -> Stock:
    return Stock(redis, Scripts.from_dir(), Coalescer(redis, max_batch=256, in_flight=4), 90_000)


async def _activity(stock: Stock, activity_id: str, quantity: int) -> None:
    now = int(time.time() * 1000)
    await stock.put_activity(
        Activity(activity_id, "sku", "t", 100, quantity, 1, now - 60_000, now + 3_600_000, 900)
    )


async def _buy(stock: Stock, activity_id: str, first: int, count: int) -> list[str]:
    results = await asyncio.gather(
        *(stock.reserve(activity_id, f"u{n}", "k", 1) for n in range(first, first + count))
    )
    assert all(r.outcome is Outcome.OK for r in results)
    return [r.order_id for r in results]


@contextlib.asynccontextmanager
async def running(*writers: Writer) -> AsyncIterator[None]:
    """Writers running in the background; on exit they finish their batch and stop."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def _grown(store: OrderStore, at_least: int) -> bool:
    return await store.count("flow") >= at_least


async def _settled(redis: Redis, activity_id: str) -> bool:
    return (await backlog(redis, keys.stream(activity_id))).total == 0


async def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _writer_process(redis_url: str, database_url: str, cwd: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(
        SECKILL_REDIS_URL=redis_url,
        SECKILL_DATABASE_URL=database_url,
        SECKILL_WRITER_CONSUMER="writer-a",
        SECKILL_WRITER_MAX_ROWS_PER_S="3000",
        SECKILL_WRITER_BATCH_SIZE="200",
        SECKILL_WRITER_BLOCK_MS="100",
        SECKILL_WRITER_CLAIM_IDLE_MS="1000",
        SECKILL_DEV="1",  # the published secrets are for tests like this one
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "seckill", "writer"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()  # printed once its signal handlers are in place
    assert line.startswith("seckill writer writer-a running"), line
    return process


@pytest.mark.alone  # 10,000 orders against a writer killed 3 times: starved among workers, its
# producer's Redis calls outlived their 5 s timeout on a loaded machine
async def test_kill_9_three_times_while_10000_orders_flow(
    redis: Redis, stock: Stock, store: OrderStore, redis_url: str, tmp_path: Path
) -> None:
    """Invariant: rows in the store == accepted orders, no duplicates, nothing left pending."""
    total = 10_000
    await _activity(stock, "flow", total)
    database_url: str = store.url  # type: ignore[attr-defined]
    writer = _writer_process(redis_url, database_url, tmp_path)
    accepted: list[str] = []

    async def produce() -> None:
        for first in range(0, total, 250):
            accepted.extend(await _buy(stock, "flow", first, 250))
            await asyncio.sleep(0.03)

    producer = asyncio.create_task(produce())
    kills = 0
    try:
        while kills < 3:
            # kill only once this writer is demonstrably writing: mid-flow, every time
            written = await store.count("flow")
            await _wait(lambda w=written: _grown(store, w + 300), 90, "the writer to write")
            writer.send_signal(signal.SIGKILL)
            await asyncio.to_thread(writer.wait, 10)
            kills += 1
            # in a thread: the new writer takes seconds to start on a busy machine, and a
            # blocked event loop would time out the producer's Redis calls meanwhile
            writer = await asyncio.to_thread(_writer_process, redis_url, database_url, tmp_path)
        await producer
        await _wait(lambda: _settled(redis, "flow"), 90, "the backlog to drain")
    finally:
        writer.send_signal(signal.SIGTERM)
        code = writer.wait(30)
    assert code == 0, "SIGTERM drains and exits 0"
    assert len(accepted) == len(set(accepted)) == total
    stored = await store.statuses("flow")
    assert len(stored) == total and set(stored) == set(accepted)
    assert await store.count("flow") == total, "no duplicates"
    pending: Any = await redis.xpending(keys.stream("flow"), GROUP)
    assert pending["pending"] == 0, "the pending list is empty"


class Proxy:
    """A TCP proxy in front of PostgreSQL that the test can cut off and restore."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._server: asyncio.base_events.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for link in list(self._links):
            link.transport.abort()
        self._links.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._links.update({writer, up_writer})

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_postgres_refusing_connections_loses_nothing(
    redis: Redis, stock: Stock, postgres_url: str
) -> None:
    direct = open_store(postgres_url)
    await direct.migrate()
    proxy = Proxy(5432)
    await proxy.start()
    proxied = open_store(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    writer = Writer(redis, proxied, WriterConfig(block_ms=50, backoff_max_s=0.3), "w-outage")
    try:
        async with running(writer):
            await _activity(stock, "outage", 1000)
            await _buy(stock, "outage", 0, 300)
            await _wait(lambda: _settled(redis, "outage"), 20, "the first orders")
            assert await direct.count("outage") == 300

            await proxy.cut()
            await _buy(stock, "outage", 300, 300)
            await _wait(lambda: _failing(writer), 20, "the writer to notice the outage")
            await _wait(lambda: _breaker_open(writer), 20, "the store breaker to open")
            await asyncio.sleep(0.5)
            assert await direct.count("outage") == 300, "nothing written while it is away"
            assert (await backlog(redis, keys.stream("outage"))).total == 300, "nothing lost"

            await proxy.start()
            await _wait(lambda: _settled(redis, "outage"), 30, "the writer to catch up")
            assert await direct.count("outage") == 600
            assert writer.breaker.state == "closed", "it closed again once the database answered"
    finally:
        await proxied.close()
        await direct.close()
        await proxy.cut()


async def _breaker_open(writer: Writer) -> bool:
    return writer.breaker.state == "open"


async def _failing(writer: Writer) -> bool:
    return writer.stats.store_failures > 0


async def test_sqlite_locked_by_another_process_loses_nothing(
    redis: Redis, stock: Stock, tmp_path: Path
) -> None:
    path = tmp_path / "orders.db"
    store = open_store(f"sqlite:///{path}")
    writer = Writer(redis, store, WriterConfig(block_ms=50, backoff_max_s=0.3), "w-locked")
    try:
        async with running(writer):
            await _activity(stock, "locked", 400)
            await _buy(stock, "locked", 0, 100)
            await _wait(lambda: _settled(redis, "locked"), 20, "the first orders")
            # another process holds the write lock (as a long migration or a backup would)
            blocker = sqlite3.connect(path, isolation_level=None, timeout=0.1)
            blocker.execute("BEGIN EXCLUSIVE")
            await _buy(stock, "locked", 100, 100)
            await _wait(lambda: _failing(writer), 30, "the writer to hit the lock")
            blocker.execute("COMMIT")
            blocker.close()
            await _wait(lambda: _settled(redis, "locked"), 30, "the writer to catch up")
        assert await store.count("locked") == 200
    finally:
        await store.close()


async def test_a_poison_entry_is_dead_lettered_and_the_rest_flows(
    redis: Redis, stock: Stock, store: OrderStore
) -> None:
    await _activity(stock, "poison", 100)
    await _buy(stock, "poison", 0, 40)
    await redis.xadd(keys.stream("poison"), {"o": b"\xc1 not msgpack"})
    await redis.xadd(keys.stream("poison"), {"unexpected": b"field"})
    await _buy(stock, "poison", 40, 40)
    writer = Writer(
        redis, store, WriterConfig(block_ms=20, retry_idle_ms=20, max_deliveries=3), "w-poison"
    )
    async with running(writer):
        await _wait(lambda: _dead_letters(redis, "poison", 2), 20, "two dead letters")
        await _wait(lambda: _settled(redis, "poison"), 20, "the pending list to drain")
    assert await store.count("poison") == 80, "every good order flowed on"
    assert writer.stats.dead_letters == 2
    dead: Any = await redis.xrange(keys.dead_letters("poison"))
    assert {fields[b"origin_stream"] for _, fields in dead} == {keys.stream("poison").encode()}


async def _dead_letters(redis: Redis, activity_id: str, count: int) -> bool:
    return int(await redis.xlen(keys.dead_letters(activity_id))) >= count


async def test_two_writers_share_the_stream_without_duplicates(
    redis: Redis, stock: Stock, store: OrderStore
) -> None:
    await _activity(stock, "pair", 2000)
    # 2000 rows/s each: neither can drain the stream alone before the other reads
    config = WriterConfig(block_ms=20, batch_size=50, max_rows_per_s=2000)
    writers = [Writer(redis, store, config, f"w{i}") for i in (1, 2)]
    async with running(*writers):
        await _buy(stock, "pair", 0, 2000)
        await _wait(lambda: _settled(redis, "pair"), 30, "both writers to drain")
    shares = [(w.stats.rows, w.stats.inserted) for w in writers]
    assert await store.count("pair") == 2000, shares
    assert all(rows > 0 for rows, _ in shares), f"both writers took a share: {shares}"
    assert sum(inserted for _, inserted in shares) == 2000, f"no row inserted twice: {shares}"


async def test_trimming_never_drops_an_unacknowledged_entry(redis: Redis, stock: Stock) -> None:
    await _activity(stock, "trim", 100)
    await _buy(stock, "trim", 0, 30)
    stream = keys.stream("trim")
    await redis.xgroup_create(stream, GROUP, id="0")
    delivered: Any = await redis.xreadgroup(GROUP, "c", {stream: ">"}, count=20)
    ids = [entry_id for entry_id, _ in delivered[0][1]]
    await redis.xack(stream, GROUP, *ids[:10])  # 10 persisted; 10 delivered, unacked; 10 unread
    assert await trim_persisted(redis, stream) == 10
    remaining: Any = await redis.xrange(stream)
    assert [entry_id for entry_id, _ in remaining][:10] == ids[10:]
    assert len(remaining) == 20, "pending and undelivered entries are all kept"


async def test_a_dead_writers_entries_are_taken_over(
    redis: Redis, stock: Stock, store: OrderStore
) -> None:
    """Entries a writer took and never acknowledged (it died) are claimed by a live one, and the
    consumer it leaves behind, holding nothing, is removed from the group."""
    await _activity(stock, "orphan", 100)
    await _buy(stock, "orphan", 0, 60)
    stream = keys.stream("orphan")
    await redis.sadd(keys.ACTIVITIES, "orphan")
    await redis.xgroup_create(stream, GROUP, id="0")
    taken: Any = await redis.xreadgroup(GROUP, "died", {stream: ">"}, count=60)
    assert len(taken[0][1]) == 60
    writer = Writer(redis, store, WriterConfig(block_ms=20, claim_idle_ms=300), "survivor")
    async with running(writer):
        await _wait(lambda: _settled(redis, "orphan"), 20, "the takeover")
        await _wait(lambda: _consumers_left(redis, stream, {"survivor"}), 20, "the dead one gone")
    assert await store.count("orphan") == 60
    assert writer.stats.consumers_forgotten >= 1


async def _consumers_left(redis: Redis, stream: str, names: set[str]) -> bool:
    consumers: Any = await redis.xinfo_consumers(stream, GROUP)
    return {c["name"].decode() for c in consumers} == names
