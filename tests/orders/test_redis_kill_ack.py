"""Redis killed between the writer's store commit and its XACK: acknowledged once Redis is
back, and the report never counts the stored orders as still to be written."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from seckill import keys, report
from seckill.embedded import EmbeddedRedis
from seckill.orders.service import OrderService
from seckill.orders.store import Batch, OrderStore, WriteResult, open_store
from seckill.orders.streams import GROUP
from seckill.scripts import Coalescer, Scripts
from seckill.settings import Settings
from seckill.stock import Stock
from seckill.web.app import redis_client
from tests.orders.test_writer import _activity, _buy


class KillsRedisAfterCommit:
    """The real store, except that its first commit kills Redis (-9) before returning.

    The writer's XACK that follows a commit is then certain to meet a dead Redis: the
    window the defect lived in, entered every time instead of one run in five.
    """

    def __init__(self, store: OrderStore, server: EmbeddedRedis) -> None:
        self.store = store
        self.server = server
        self.committed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def write(self, batch: Batch) -> WriteResult:
        result = await self.store.write(batch)
        if not self.committed.is_set() and batch.created:
            process = self.server._process
            assert process is not None
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            self.committed.set()
        return result


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    embedded = EmbeddedRedis(tmp_path / "redis", appendfsync="always")
    embedded.start()
    yield embedded
    embedded.stop()


@pytest.mark.parametrize("deep_limit", [report.DEEP_LIMIT, 0], ids=["deep", "counts"])
async def test_a_batch_committed_while_redis_died_is_acked_when_it_is_back(
    server: EmbeddedRedis, settings: Settings, tmp_path: Path, deep_limit: int
) -> None:
    """Invariant: stored + pending write == created within seconds of a Redis restart, on
    both readings of the report (every order compared, or counts only)."""
    # entries of a gone writer are claimed after 10 minutes: only the deferred acks (and the
    # report's own reading) can make it consistent within this test's waits
    settings = settings.replace("redis", url=server.url).replace("writer", claim_idle_ms=600_000)
    client = redis_client(settings)  # the writer's own client: one reconnect per call
    store = open_store(f"sqlite:///{tmp_path / 'orders.db'}")
    await store.migrate()
    stock = Stock(client, Scripts.from_dir(), Coalescer(client, max_batch=64, in_flight=2), 90_000)
    await _activity(stock, "ack", 100)
    accepted = await _buy(stock, "ack", 0, 40)
    killer = KillsRedisAfterCommit(store, server)
    service = OrderService(settings, client, killer)  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(killer.committed.wait(), 30)
        assert await store.count("ack") > 0, "the batch was committed before Redis died"
        server.start()  # same port, same AOF: the entries are pending again, as before the kill
        restarted = time.monotonic()
        body: dict[str, Any] | None = None
        while time.monotonic() - restarted < 30:
            body = await report.build(client, store, "ack", deep_limit=deep_limit)
            if body is not None and body["consistent"]:
                break
            await asyncio.sleep(0.1)
        print(f"consistent {time.monotonic() - restarted:.2f}s after the restart")
        assert body is not None and body["consistent"], body and body["problems"]
        assert body["orders_in_store"] + body["orders_pending_write"] == len(accepted)
        pending: Any = await client.xpending(keys.stream("ack"), GROUP)
        # the acks deferred by the kill went first once Redis answered: nothing stays pending
        deadline = time.monotonic() + 30
        while pending["pending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            pending = await client.xpending(keys.stream("ack"), GROUP)
        assert pending["pending"] == 0
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await client.aclose()
        await store.close()
