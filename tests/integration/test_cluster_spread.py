"""Many activities on a Redis Cluster: spread over every master by slot, every order stored
exactly once by two writers reading them all."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from redis.crc import key_slot

from seckill import connections, keys
from seckill import settings as settings_module
from seckill.activities import Activity
from seckill.orders.store import OrderStore
from seckill.orders.streams import backlog
from seckill.orders.writer import Writer, WriterConfig
from seckill.scripts import Coalescer, Scripts
from seckill.stock import Outcome, Stock
from seckill.topology import Cluster

ACTIVITIES = 30
ORDERS_EACH = 20


async def _drained(client: connections.Client, activity_ids: list[str]) -> bool:
    for activity_id in activity_ids:
        if (await backlog(client, keys.stream(activity_id))).total:
            return False
    return True


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
async def test_thirty_activities_on_three_masters_two_writers_store_each_order_once(
    redis_cluster: Cluster, store: OrderStore
) -> None:
    redis_cluster.flush()
    settings = settings_module.load(environ={"SECKILL_REDIS_URL": redis_cluster.url})
    buyer = connections.connect(settings.redis)
    stock = Stock(buyer, Scripts.from_dir(), Coalescer(buyer, max_batch=64, in_flight=4), 90_000)
    activity_ids = [f"spread-{n}" for n in range(ACTIVITIES)]
    now = int(time.time() * 1000)
    for activity_id in activity_ids:
        await stock.put_activity(
            Activity(activity_id, "sku", "t", 100, ORDERS_EACH, 1, now - 1000, now + 3_600_000, 900)
        )
    owners = {
        a: redis_cluster.node_for_slot(key_slot(keys.meta(a).encode())).port for a in activity_ids
    }
    per_master = Counter(owners.values())
    assert set(per_master) == {m.port for m in redis_cluster.masters()}, per_master
    for activity_id in activity_ids:  # each activity's keys live where its slot says
        assert await buyer.exists(keys.stock(activity_id))

    # two writers, as two processes would be: each its own client, both reading every activity
    config = WriterConfig(block_ms=50, batch_size=50, discover_interval_s=0.2)
    clients = [connections.connect(settings.redis) for _ in range(2)]
    writers = [Writer(c, store, config, f"spread-w{i}") for i, c in enumerate(clients)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    try:
        results = await asyncio.gather(
            *(
                stock.reserve(activity_id, f"u{n}", f"k{n}", 1)
                for activity_id in activity_ids
                for n in range(ORDERS_EACH)
            )
        )
        assert all(r.outcome is Outcome.OK for r in results)
        deadline = time.monotonic() + 60
        while not await _drained(buyer, activity_ids):
            assert time.monotonic() < deadline, "the writers did not drain every activity"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for client in [buyer, *clients]:
            await connections.close(client)
    counts = {a: await store.count(a) for a in activity_ids}
    assert counts == dict.fromkeys(activity_ids, ORDERS_EACH)
    shares = [(w.stats.rows, w.stats.inserted) for w in writers]
    assert sum(inserted for _, inserted in shares) == ACTIVITIES * ORDERS_EACH, shares
    assert all(rows > 0 for rows, _ in shares), f"both writers took a share: {shares}"
