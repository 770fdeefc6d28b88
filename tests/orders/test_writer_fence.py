"""durability = "replicated": the writer commits nothing that a replica does not hold yet.

Invariant: after a failover the store holds no order that Redis lost. An order whose WAIT ran
out is on the primary only (its client got a 503 and retries with the same key); a writer
that stored it at once would leave, if the primary then died, a row for an order nobody was
told about and that the promoted replica never had.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from seckill.activities import Activity
from seckill.embedded import EmbeddedRedis, free_port
from seckill.orders.fence import Fence
from seckill.orders.intake import Intake
from seckill.orders.store import OrderStore, open_store
from seckill.orders.writer import Writer, WriterConfig
from seckill.scripts import Coalescer, Scripts
from seckill.stock import Outcome, Stock
from seckill.topology import HOST, wait_until

ACTIVITY = "fenced"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    """A primary and its replica, in sync."""
    port = free_port()
    primary = EmbeddedRedis(tmp_path / "primary", appendfsync="no", port=port)
    replica = EmbeddedRedis(
        tmp_path / "replica",
        appendfsync="no",
        port=free_port(),
        extra_args=("--replicaof", HOST, str(port)),
    )
    try:
        primary.start()
        replica.start()
        probe = redis.Redis(host=HOST, port=replica.port)

        def synced() -> bool:
            return probe.info("replication").get("master_link_status") == "up"

        wait_until(synced, 30, "the replica in sync")
        probe.close()
        yield primary, replica
    finally:
        with contextlib.suppress(Exception):
            os.kill(replica._process.pid, signal.SIGCONT)  # type: ignore[union-attr]
        replica.stop()
        primary.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[OrderStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'orders.db'}")
    await opened.migrate()
    yield opened
    await opened.close()


async def _until(predicate: object, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_the_writer_stores_only_what_a_replica_holds(
    pair: tuple[EmbeddedRedis, EmbeddedRedis], store: OrderStore
) -> None:
    primary, replica = pair
    client = Redis(host=HOST, port=primary.port, max_connections=16)
    # the orders are placed without a WAIT: as a 202 that ran out of time leaves them
    stock = Stock(client, Scripts.from_dir(), Coalescer(client, max_batch=16, in_flight=2), 90_000)
    fence = Fence(client, replica_wait_ms=100)
    writer = Writer(client, store, WriterConfig(block_ms=50, retry_idle_ms=200), fence=fence)
    now = int(time.time() * 1000)
    await stock.put_activity(
        Activity(ACTIVITY, "sku", "t", 100, 100, 1, now - 60_000, now + 3_600_000, 900)
    )

    async def buy(first: int, count: int) -> None:
        results = await asyncio.gather(
            *(stock.reserve(ACTIVITY, f"u{n}", "k", 1) for n in range(first, first + count))
        )
        assert all(r.outcome is Outcome.OK for r in results)

    async def stored(count: int) -> bool:
        return await store.count(ACTIVITY) == count

    stop = asyncio.Event()
    running = asyncio.create_task(writer.run(stop))
    try:
        await buy(0, 5)
        await _until(lambda: stored(5), "the replicated orders stored")

        faults_before = writer.stats.redis_errors
        os.kill(replica._process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            await buy(5, 5)  # on the primary only: no replica acknowledges anything now

            async def refused() -> bool:
                # cumulative (writer.faults is cleared by any round that reads nothing)
                return writer.stats.redis_errors >= faults_before + 3

            await _until(refused, "the writer to wait for a replica")
            assert await store.count(ACTIVITY) == 5, "stored before a replica held them"
        finally:
            os.kill(replica._process.pid, signal.SIGCONT)  # type: ignore[union-attr]

        # the replica catches up: the same entries, still pending, are stored now
        await _until(lambda: stored(10), "the orders stored once replicated")
        assert writer.stats.dead_letters == 0
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await stock.close()
        await fence.close()
        await client.aclose()


async def test_an_entry_the_node_no_longer_holds_is_never_stored(
    pair: tuple[EmbeddedRedis, EmbeddedRedis], store: OrderStore
) -> None:
    """After a failover the fence may run on the promoted node, which never had an entry the
    old primary gave the writer: that entry is not stored, the others are.

    The promoted node's stream is the old one without that entry; here the entry is deleted
    after it was read, which leaves the stream the same way.
    """
    primary, _ = pair
    client = Redis(host=HOST, port=primary.port, max_connections=16)
    stock = Stock(client, Scripts.from_dir(), Coalescer(client, max_batch=16, in_flight=2), 90_000)
    fence = Fence(client, replica_wait_ms=2000)
    writer = Writer(client, store, fence=fence)
    now = int(time.time() * 1000)
    try:
        await stock.put_activity(
            Activity(ACTIVITY, "sku", "t", 100, 100, 1, now - 60_000, now + 3_600_000, 900)
        )
        for n in range(3):
            assert (await stock.reserve(ACTIVITY, f"u{n}", "k", 1)).outcome is Outcome.OK
        intake = Intake(client, batch_size=100, block_ms=50)
        await intake.discover()
        entries = await intake.read("w1", block=False)
        assert len(entries) == 3
        lost = entries[1]
        await client.xdel(lost.stream, lost.entry_id)
        fenced = await fence.sort(entries)
        assert fenced.gone == [lost] and fenced.held == [entries[0], entries[2]]
        await writer._apply(entries, asyncio.Event())
        assert await store.count(ACTIVITY) == 2
        assert writer.stats.entries_gone == 1 and writer.stats.dead_letters == 0
    finally:
        await stock.close()
        await fence.close()
        await client.aclose()
