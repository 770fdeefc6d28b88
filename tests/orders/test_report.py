"""The report is a true snapshot: consistent under live traffic, and it names every drift."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys
from seckill.orders.record import OrderRecord
from seckill.orders.retirement import Retirer
from seckill.orders.store import Batch, Transition
from seckill.orders.streams import GROUP, ensure_group
from seckill.orders.sweeper import Sweeper
from seckill.orders.writer import Writer, WriterConfig
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, user_headers

Client = TestClient[Any, Any]
PRICE = 1000


@pytest.fixture(params=["sqlite", "postgres"])
async def gateway(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path, sync_redis: redis.Redis
) -> AsyncIterator[Client]:
    """The gateway on each store, without per-user rate limits, its loops said to be alive."""
    rules = tmp_path / "limits.toml"
    rules.write_text("[default]\nuser_rate_per_s = 0\nuser_burst = 0\n", encoding="utf-8")
    settings = settings.replace("limits", rules_path=str(rules))
    if request.param == "postgres":
        settings = settings.replace("database", url=request.getfixturevalue("postgres_url"))
    for loop in ("writer", "sweeper"):
        sync_redis.set(keys.heartbeat(loop), "test", ex=300)
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def _activity(client: Client, settings: Settings, **overrides: Any) -> str:
    body = activity_body(**({"price_cents": PRICE, "stock": 100_000} | overrides))
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201
    return str(body["id"])


async def _buy(client: Client, settings: Settings, activity_id: str, user: str, key: str) -> Any:
    return await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, user, key),
    )


async def _report(client: Client, settings: Settings, activity_id: str) -> dict[str, Any]:
    response = await client.get(
        f"/admin/v1/activities/{activity_id}/report", headers=admin_headers(settings)
    )
    assert response.status == 200
    return dict(await response.json())


async def test_sixty_reports_during_a_steady_sale_are_all_consistent(
    gateway: Client, settings: Settings
) -> None:
    """Invariant: under live traffic (orders, payments, cancels, expiries, writes, retirement)
    every report is consistent: one atomic reading, nothing counted twice or missed."""
    from seckill.auth import PaymentSignature

    client = gateway
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings, payment_timeout_s=1, per_user_limit=1000)
    writer = Writer(services.redis, services.store, WriterConfig(block_ms=20), "steady")
    sweeper = Sweeper(services.stock, interval_s=0.1)
    retirer = Retirer(services.redis, services.store, interval_s=0.1, grace_s=0.3)
    stop = asyncio.Event()
    loops = [asyncio.create_task(x.run(stop)) for x in (writer, sweeper, retirer)]
    signer = PaymentSignature(settings.payment.secret, 300)
    rng = random.Random(7)

    async def shopper(n: int) -> None:
        cycle = 0
        while not stop.is_set():
            cycle += 1
            response = await _buy(client, settings, activity_id, f"u{n}", f"k{cycle}")
            if response.status != 202:  # still holding one that will expire
                await asyncio.sleep(0.05)
                continue
            order_id = (await response.json())["order_id"]
            choice = rng.random()
            if choice < 0.4:
                raw = (
                    f'{{"event_id": "e-{order_id.replace(".", "_")}", "order_id": "{order_id}",'
                    f' "amount_cents": {PRICE}, "status": "SUCCESS"}}'
                ).encode()
                await client.post(
                    "/api/v1/payments/notify",
                    data=raw,
                    headers={"Seckill-Signature": signer.sign(raw)},
                )
            elif choice < 0.8:
                await client.post(
                    f"/api/v1/orders/{order_id}/cancel",
                    headers=user_headers(settings, f"u{n}"),
                )
            await asyncio.sleep(rng.uniform(0, 0.02))

    shoppers = [asyncio.create_task(shopper(n)) for n in range(8)]
    reports = []
    # the production store takes all sixty; SQLite, whose reads queue behind the writer's
    # commits (about a second each here), takes twenty so the suite stays short
    count = 20 if type(services.store).__name__ == "SqliteStore" else 60
    try:
        for _ in range(count):
            reports.append(await _report(client, settings, activity_id))
            await asyncio.sleep(0.03)
    finally:
        stop.set()
        await asyncio.gather(*shoppers, *loops)
    inconsistent = [r for r in reports if not r["consistent"]]
    assert not inconsistent, inconsistent[0]["problems"]
    assert reports[-1]["orders_created"] > reports[0]["orders_created"] + 20, "traffic was live"
    assert any(r["paid"] for r in reports) and any(r["released"] for r in reports)
    assert any(r["orders_in_store"] for r in reports), "the writer was writing meanwhile"


async def test_a_committed_batch_whose_ack_was_lost_is_counted_once(
    gateway: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """Invariant: an entry pending in the group whose order is already stored counts once."""
    client = gateway
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    for n in range(5):
        assert (await _buy(client, settings, activity_id, f"u{n}", "k")).status == 202
    stream = keys.stream(activity_id)
    await ensure_group(services.redis, stream)
    # a writer reads three entries, commits them to the store, and dies before its XACK
    reply: Any = await services.redis.xreadgroup(GROUP, "crashed", {stream: ">"}, count=3)
    entries = reply[0][1]
    await services.store.write(Batch(created=[OrderRecord.unpack(f[b"o"]) for _, f in entries]))

    report = await _report(client, settings, activity_id)
    assert report["orders_in_store"] == 3
    assert report["orders_pending_write"] == 2, "3 pending but stored, 2 never delivered"
    assert report["consistent"] is True, report["problems"]

    # the restarted writer re-delivers them: still nothing counted twice
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "crashed").drain()
    report = await _report(client, settings, activity_id)
    assert (report["orders_in_store"], report["orders_pending_write"]) == (5, 0)
    assert report["consistent"] is True, report["problems"]
    assert sync_redis.xpending(stream, GROUP)["pending"] == 0


@pytest.mark.parametrize("deep_limit", [100, 0])
async def test_a_change_written_before_its_order_creation_is_counted_once(
    gateway: Client, settings: Settings, deep_limit: int
) -> None:
    """A writer that takes changes before creations (fair batches) stores the order from its
    change; its creation entry, still undelivered, is not counted a second time."""
    import msgpack

    from seckill import report

    client = gateway
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    for stream in (keys.stream(activity_id), keys.changes(activity_id)):
        await ensure_group(services.redis, stream)
    order_id = (await (await _buy(client, settings, activity_id, "u0", "k")).json())["order_id"]
    await client.post(f"/api/v1/orders/{order_id}/cancel", headers=user_headers(settings, "u0"))
    changes = keys.changes(activity_id)
    reply: Any = await services.redis.xreadgroup(GROUP, "fair", {changes: ">"}, count=1)
    entry_id, fields = reply[0][1][0]
    change = msgpack.unpackb(fields[b"c"], raw=False)
    transition = Transition(
        order=OrderRecord.unpack(msgpack.packb(change["order"])),
        from_state=change["from"],
        to_state=change["to"],
        at_ms=change["at"],
    )
    await services.store.write(Batch(transitions=[transition]))
    await services.redis.xack(changes, GROUP, entry_id)

    body = await report.build(services.redis, services.store, activity_id, deep_limit=deep_limit)
    assert body is not None
    assert (body["orders_in_store"], body["orders_pending_write"]) == (1, 0)
    assert body["consistent"] is True, body["problems"]


async def test_counts_hold_without_reading_every_order(
    gateway: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """A report past the record limit (a huge sale) still counts once and still sees a loss."""
    from seckill import report

    client = gateway
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    for n in range(5):
        assert (await _buy(client, settings, activity_id, f"u{n}", "k")).status == 202
    stream = keys.stream(activity_id)
    await ensure_group(services.redis, stream)
    reply: Any = await services.redis.xreadgroup(GROUP, "crashed", {stream: ">"}, count=3)
    records = [OrderRecord.unpack(f[b"o"]) for _, f in reply[0][1]]
    await services.store.write(Batch(created=records))

    body = await report.build(services.redis, services.store, activity_id, deep_limit=2)
    assert body is not None and body["orders_checked"] is False
    assert (body["orders_in_store"], body["orders_pending_write"]) == (3, 2)
    assert body["consistent"] is True, body["problems"]

    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "crashed").drain()
    url = getattr(services.store, "url", None) or getattr(services.store, "path", "")
    await _delete_row(str(url), records[0].order_id)
    body = await report.build(services.redis, services.store, activity_id, deep_limit=2)
    assert body is not None and body["consistent"] is False
    assert "orders: 4 stored + 0 pending write != 5 created" in body["problems"]


async def test_a_lost_stream_entry_makes_the_next_report_inconsistent(
    gateway: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    client = gateway
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    stream = keys.stream(activity_id)
    await ensure_group(services.redis, stream)
    for n in range(3):
        assert (await _buy(client, settings, activity_id, f"u{n}", "k")).status == 202
    assert (await _report(client, settings, activity_id))["consistent"] is True

    # an undelivered entry disappears (an operator's XDEL, a bad trim)
    entry_id = sync_redis.xrange(stream, "-", "+")[1][0]
    sync_redis.xdel(stream, entry_id)
    report = await _report(client, settings, activity_id)
    assert report["consistent"] is False
    assert any("deleted before the writers read them" in p for p in report["problems"]), report

    # once the writers have read past it, the count itself says it
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    report = await _report(client, settings, activity_id)
    assert report["consistent"] is False
    assert "orders: 2 stored + 0 pending write != 3 created" in report["problems"], report


async def test_a_lost_pending_entry_is_named(
    gateway: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    client = gateway
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    stream = keys.stream(activity_id)
    await ensure_group(services.redis, stream)
    for n in range(2):
        assert (await _buy(client, settings, activity_id, f"u{n}", "k")).status == 202
    # delivered to a writer that has not written it yet, then deleted from the stream
    reply: Any = await services.redis.xreadgroup(GROUP, "slow", {stream: ">"}, count=1)
    sync_redis.xdel(stream, reply[0][1][0][0])
    report = await _report(client, settings, activity_id)
    assert report["consistent"] is False
    assert any(
        p.startswith("1 pending entries of the orders stream were deleted")
        for p in report["problems"]
    ), report


async def test_a_deleted_store_row_makes_the_next_report_inconsistent(
    gateway: Client, settings: Settings
) -> None:
    client = gateway
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    orders = []
    for n in range(4):
        response = await _buy(client, settings, activity_id, f"u{n}", "k")
        orders.append((await response.json())["order_id"])
    await client.post(f"/api/v1/orders/{orders[0]}/cancel", headers=user_headers(settings, "u0"))
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    await Retirer(services.redis, services.store, grace_s=0).retire_once()  # orders[0] leaves
    assert (await _report(client, settings, activity_id))["consistent"] is True

    url = getattr(services.store, "url", None) or getattr(services.store, "path", "")
    for victim, line in (
        (orders[1], "orders: 3 stored + 0 pending write != 4 created"),  # still in Redis
        (orders[0], "1 of 4 created orders are neither in Redis nor in the store"),  # retired
    ):
        await _delete_row(str(url), victim)
        report = await _report(client, settings, activity_id)
        assert report["consistent"] is False
        assert line in report["problems"], report


async def _delete_row(url: str, order_id: str) -> None:
    if url.startswith("postgres"):
        import asyncpg

        connection = await asyncpg.connect(url)
        try:
            await connection.execute("DELETE FROM orders WHERE order_id = $1", order_id)
        finally:
            await connection.close()
    else:
        import sqlite3

        with sqlite3.connect(url) as db:
            db.execute("DELETE FROM orders WHERE order_id = ?", (order_id,))


async def test_a_group_that_cannot_count_its_lag_is_counted_boundedly(
    gateway: Client, settings: Settings, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an AOF replay or a promotion the group's lag is nil: the report counts at most a
    bounded tail, and says so when the tail is longer (never reads it all)."""
    from seckill import report

    client = gateway
    services = client.server.app[SERVICES]
    activity_id = await _activity(client, settings)
    stream = keys.stream(activity_id)
    for n in range(3):
        assert (await _buy(client, settings, activity_id, f"u{n}", "k")).status == 202
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    for n in range(3, 5):
        assert (await _buy(client, settings, activity_id, f"u{n}", "k")).status == 202
    # SETID without ENTRIESREAD forgets the group's read counter, as a replay can
    last = sync_redis.xinfo_groups(stream)[0]["last-delivered-id"]
    sync_redis.execute_command("XGROUP", "SETID", stream, GROUP, last)
    assert sync_redis.xinfo_groups(stream)[0]["lag"] is None

    body = await _report(client, settings, activity_id)
    assert (body["orders_in_store"], body["orders_pending_write"]) == (3, 2)
    assert body["consistent"] is True, body["problems"]

    monkeypatch.setattr(report, "TAIL_CAP", 1)
    body = await _report(client, settings, activity_id)
    assert body["consistent"] is False
    assert any("not countable" in p for p in body["problems"]), body["problems"]
