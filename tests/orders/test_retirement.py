"""Bounded memory: ended orders leave Redis once stored; reads, cancels, callbacks still answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys
from seckill.auth import PaymentSignature
from seckill.orders.retirement import Retirer
from seckill.orders.store import OrderStore, StoreUnavailable
from seckill.orders.writer import Writer, WriterConfig
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, user_headers

Client = TestClient[Any, Any]
PRICE = 1000


@pytest.fixture
async def unlimited(settings: Settings, tmp_path: Path) -> AsyncIterator[Client]:
    """The gateway without per-user rate limits (a shopper looping as fast as it can)."""
    rules = tmp_path / "limits.toml"
    rules.write_text(
        "[default]\nuser_rate_per_s = 0\nuser_burst = 0\n"
        "[orders]\nread_rate_per_s = 0\ncancel_rate_per_s = 0\n",
        encoding="utf-8",
    )
    app = create_app(settings.replace("limits", rules_path=str(rules)))
    async with TestClient(TestServer(app)) as client:
        yield client


async def _activity(client: Client, settings: Settings, stock: int = 50) -> str:
    body = activity_body(price_cents=PRICE, stock=stock, per_user_limit=1)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201
    return str(body["id"])


async def _buy(client: Client, settings: Settings, activity_id: str, user: str, key: str) -> str:
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, user, key),
    )
    assert response.status == 202, await response.text()
    return str((await response.json())["order_id"])


async def _cancel(client: Client, settings: Settings, order_id: str, user: str) -> Any:
    return await client.post(
        f"/api/v1/orders/{order_id}/cancel", headers=user_headers(settings, user)
    )


async def _notify(
    client: Client, settings: Settings, order_id: str, event_id: str, status: str = "SUCCESS"
) -> tuple[int, Any]:
    raw = json.dumps(
        {"event_id": event_id, "order_id": order_id, "amount_cents": PRICE, "status": status}
    ).encode()
    signature = PaymentSignature(settings.payment.secret, 300).sign(raw)
    response = await client.post(
        "/api/v1/payments/notify", data=raw, headers={"Seckill-Signature": signature}
    )
    return response.status, await response.json()


async def _until(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_reserve_cancel_cycles_leave_no_order_record_in_redis(
    unlimited: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """Invariant: Redis memory is bounded: an ended order leaves Redis once the store has it."""
    client = unlimited
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    writer = Writer(services.redis, services.store, WriterConfig(block_ms=20), "retire-test")
    retirer = Retirer(services.redis, services.store, interval_s=0.05, grace_s=0.2)
    stop = asyncio.Event()
    loops = [asyncio.create_task(writer.run(stop)), asyncio.create_task(retirer.run(stop))]

    users, cycles = 20, 100

    async def shopper(n: int) -> list[str]:
        mine = []
        for c in range(cycles):
            order_id = await _buy(client, settings, activity_id, f"u{n}", f"k{c}")
            assert (await _cancel(client, settings, order_id, f"u{n}")).status == 200
            mine.append(order_id)
        return mine

    try:
        orders = [o for mine in await asyncio.gather(*map(shopper, range(users))) for o in mine]
        assert len(orders) == users * cycles

        async def all_retired() -> bool:
            return int(sync_redis.hlen(keys.orders(activity_id))) == 0

        await _until(all_retired)
    finally:
        stop.set()
        await asyncio.gather(*loops)
    assert sync_redis.zcard(keys.retiring(activity_id)) == 0
    assert len(await services.store.statuses(activity_id)) == users * cycles
    assert retirer.stats.retired == users * cycles, "each counted once, as it left"

    # the owner still reads it, from the store; anyone else still gets a 404
    order_id = orders[-1]
    owner = f"u{users - 1}"
    mine = await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(settings, owner))
    assert mine.status == 200 and (await mine.json())["status"] == "cancelled"
    theirs = await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(settings, "eve"))
    assert theirs.status == 404
    # a retried cancel answers 200 again for the owner, 404 for anyone else
    again = await _cancel(client, settings, order_id, owner)
    assert again.status == 200 and (await again.json())["status"] == "cancelled"
    assert (await _cancel(client, settings, order_id, "eve")).status == 404
    # a late payment: refund_required (SUCCESS) or ignored (FAILED), replayed the same
    assert await _notify(client, settings, order_id, "late-1") == (
        200,
        {"result": "refund_required"},
    )
    assert await _notify(client, settings, order_id, "late-1") == (
        200,
        {"result": "refund_required"},
    )
    assert await _notify(client, settings, order_id, "late-2", "FAILED") == (
        200,
        {"result": "ignored"},
    )
    # and the callbacks reach the store through the changes stream
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "retire-test").drain()
    assert sorted(await services.store.payments(order_id)) == [
        ("late-1", "refund_required"),
        ("late-2", "ignored"),
    ]
    counters = sync_redis.hgetall(keys.counters(activity_id))
    assert int(counters[b"released"]) == users * cycles and int(counters[b"reserved"]) == 0
    for loop in ("writer", "sweeper"):
        sync_redis.set(keys.heartbeat(loop), "test", ex=60)
    report = await client.get(
        f"/admin/v1/activities/{activity_id}/report", headers=admin_headers(settings)
    )
    body = await report.json()
    assert body["consistent"] is True, body["problems"]
    assert body["orders_in_store"] == users * cycles


async def test_only_ended_orders_the_store_holds_in_that_state_leave(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    kept = await _buy(client, settings, activity_id, "alice", "k1")
    cancelled = await _buy(client, settings, activity_id, "bob", "k1")
    paid = await _buy(client, settings, activity_id, "carol", "k1")
    assert (await _cancel(client, settings, cancelled, "bob")).status == 200
    assert await _notify(client, settings, paid, "ev-paid") == (200, {"result": "paid"})
    retirer = Retirer(services.redis, services.store, grace_s=0)

    # the store has not recorded the endings yet: nothing leaves
    assert await retirer.retire_once() == 0
    assert sync_redis.hlen(keys.orders(activity_id)) == 3

    writer = Writer(services.redis, services.store, WriterConfig(block_ms=10), "w")
    await writer.drain()
    # within the grace period nothing leaves either
    assert await Retirer(services.redis, services.store, grace_s=60).retire_once() == 0
    assert await retirer.retire_once() == 2
    left = {k.decode() for k in sync_redis.hkeys(keys.orders(activity_id))}
    assert left == {kept}, "a reserved order stays in Redis"

    # a paid order that left Redis: read from the store, not cancellable, a second payment
    # under another event id is refund_required
    read = await client.get(f"/api/v1/orders/{paid}", headers=user_headers(settings, "carol"))
    assert (await read.json())["status"] == "paid"
    refused = await _cancel(client, settings, paid, "carol")
    assert refused.status == 409 and (await refused.json())["error"]["code"] == "not_cancellable"
    assert await _notify(client, settings, paid, "ev-paid") == (200, {"result": "paid"})
    assert await _notify(client, settings, paid, "ev-other") == (
        200,
        {"result": "refund_required"},
    )
    # an unknown order of a known activity is still a 404 for callbacks and cancels
    ghost = f"{activity_id}.{'0' * 20}"
    status, body = await _notify(client, settings, ghost, "ev-ghost")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert (await _cancel(client, settings, ghost, "alice")).status == 404


async def test_an_order_whose_ending_never_reaches_the_store_does_not_hold_up_the_rest(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """A stuck head of the queue (its change dead-lettered) moves back; the rest still leave."""
    import msgpack

    from seckill.orders.record import OrderRecord
    from seckill.orders.store import Batch, Transition

    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    stuck = await _buy(client, settings, activity_id, "alice", "k1")
    assert (await _cancel(client, settings, stuck, "alice")).status == 200
    await asyncio.sleep(0.01)  # queued strictly after the stuck one
    fine = await _buy(client, settings, activity_id, "bob", "k1")
    assert (await _cancel(client, settings, fine, "bob")).status == 200
    # only the second cancellation reaches the store
    for _, fields in sync_redis.xrange(keys.changes(activity_id), "-", "+"):
        change = msgpack.unpackb(fields[b"c"], raw=False)
        if change["order"]["order_id"] == fine:
            record = OrderRecord.unpack(msgpack.packb(change["order"]))
            transition = Transition(record, change["from"], change["to"], change["at"])
            await services.store.write(Batch(created=[record], transitions=[transition]))

    retirer = Retirer(services.redis, services.store, grace_s=0, batch_size=1, requeue_after_s=0)
    assert await retirer.retire_once() == 0, "the stuck one is looked at first, and kept"
    assert await retirer.retire_once() == 1, "then it has moved behind the other one"
    left = {k.decode() for k in sync_redis.hkeys(keys.orders(activity_id))}
    assert left == {stuck}
    assert sync_redis.zrange(keys.retiring(activity_id), 0, -1) == [stuck.encode()]


class _StoreFailingOnce:
    """The real store, whose ``statuses_of`` is away once, on its ``fail_on``-th call."""

    def __init__(self, store: OrderStore, fail_on: int) -> None:
        self._store = store
        self._calls = 0
        self._fail_on = fail_on

    async def statuses_of(self, order_ids: list[str]) -> dict[str, str]:
        self._calls += 1
        if self._calls == self._fail_on:
            raise StoreUnavailable("database is locked")
        return await self._store.statuses_of(order_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_a_pass_that_fails_halfway_still_counts_what_left(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """Invariant: retired counts every record that left Redis, a pass cut short included (a
    busy SQLite under the writer once made the count 1,960 of 2,000)."""
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    ended = []
    for user in ("alice", "bob", "carol"):
        order_id = await _buy(client, settings, activity_id, user, "k1")
        assert (await _cancel(client, settings, order_id, user)).status == 200
        ended.append(order_id)
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    store = cast(OrderStore, _StoreFailingOnce(services.store, fail_on=2))
    retirer = Retirer(services.redis, store, grace_s=0, batch_size=1)

    with pytest.raises(StoreUnavailable):
        await retirer.retire_once()
    assert sync_redis.hlen(keys.orders(activity_id)) == 2, "the first batch left"
    assert retirer.stats.retired == 1
    assert await retirer.retire_once() == 2
    assert retirer.stats.retired == 3 and sync_redis.hlen(keys.orders(activity_id)) == 0
