"""The life of an order: pay, cancel, expire, refund_required, and the report that proves it."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from seckill import keys
from seckill.auth import PaymentSignature
from seckill.orders.sweeper import Sweeper
from seckill.orders.writer import Writer, WriterConfig
from seckill.settings import Settings
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, user_headers

pytestmark = pytest.mark.contract

Client = TestClient[Any, Any]
PRICE = 1000


async def _activity(client: Client, settings: Settings, **overrides: Any) -> str:
    body = activity_body(**({"price_cents": PRICE, "stock": 10, "per_user_limit": 2} | overrides))
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201
    return str(body["id"])


async def _buy(client: Client, settings: Settings, activity_id: str, user: str, q: int = 1) -> str:
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": q},
        headers=user_headers(settings, user, f"key-{user}-{q}"),
    )
    assert response.status == 202, await response.text()
    return str((await response.json())["order_id"])


async def _notify(
    client: Client,
    settings: Settings,
    order_id: str,
    event_id: str,
    amount: int = PRICE,
    status: str = "SUCCESS",
    signature: str | None = None,
) -> Any:
    raw = json.dumps(
        {"event_id": event_id, "order_id": order_id, "amount_cents": amount, "status": status}
    ).encode()
    if signature is None:
        signature = PaymentSignature(settings.payment.secret, 300).sign(raw)
    return await client.post(
        "/api/v1/payments/notify", data=raw, headers={"Seckill-Signature": signature}
    )


async def _order(client: Client, settings: Settings, order_id: str, user: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(settings, user))
    assert response.status == 200
    return dict(await response.json())


def _counters(sync_redis: redis.Redis, activity_id: str) -> dict[str, int]:
    raw = sync_redis.hgetall(keys.counters(activity_id))
    return {k.decode(): int(v) for k, v in raw.items()} | {
        "available": int(sync_redis.get(keys.stock(activity_id)))
    }


async def _expire_now(sync_redis: redis.Redis, client: Client, order_id: str) -> None:
    """Move an order's deadline into the past (as time would) and run one sweep."""
    import msgpack

    activity_id = keys.activity_of_order(order_id)
    assert activity_id is not None
    record = msgpack.unpackb(sync_redis.hget(keys.orders(activity_id), order_id), raw=False)
    record["expires_at"] = int(time.time() * 1000) - 1
    sync_redis.hset(keys.orders(activity_id), order_id, msgpack.packb(record))
    sync_redis.zadd(keys.deadlines(activity_id), {order_id: record["expires_at"]})
    await Sweeper(client.server.app[SERVICES].stock).sweep()


async def test_payment_pays_once_and_replays_the_same_answer(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice", 2)
    response = await _notify(client, settings, order_id, "ev-1", amount=2 * PRICE)
    assert response.status == 200 and await response.json() == {"result": "paid"}
    after = _counters(sync_redis, activity_id)
    assert after["paid"] == 2 and after["reserved"] == 0

    again = await _notify(client, settings, order_id, "ev-1", amount=2 * PRICE)
    assert await again.json() == {"result": "paid"}
    assert _counters(sync_redis, activity_id) == after, "a replayed event has no second effect"

    other = await _notify(client, settings, order_id, "ev-2", amount=2 * PRICE)
    assert await other.json() == {"result": "refund_required"}, "paid under another event"
    assert _counters(sync_redis, activity_id) == after

    order = await _order(client, settings, order_id, "alice")
    assert order["status"] == "paid" and order["paid_at"] is not None
    cancel = await client.post(
        f"/api/v1/orders/{order_id}/cancel", headers=user_headers(settings, "alice")
    )
    assert cancel.status == 409
    assert (await cancel.json())["error"]["code"] == "not_cancellable"


async def test_failed_payment_is_ignored_and_changes_nothing(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice")
    before = _counters(sync_redis, activity_id)
    response = await _notify(client, settings, order_id, "ev-f", status="FAILED")
    assert await response.json() == {"result": "ignored"}
    assert (await _order(client, settings, order_id, "alice"))["status"] == "reserved"
    assert _counters(sync_redis, activity_id) == before
    paid = await _notify(client, settings, order_id, "ev-s")
    assert await paid.json() == {"result": "paid"}, "a later success still pays"


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("amount mismatch", 400, "invalid_request"),
        ("unknown order", 404, "not_found"),
        ("malformed order id", 404, "not_found"),
        ("forged", 401, "unauthorized"),
        ("stale", 401, "unauthorized"),
        ("future", 401, "unauthorized"),
        ("missing signature", 401, "unauthorized"),
        ("malformed signature", 401, "unauthorized"),
        ("signature of another body", 401, "unauthorized"),
        ("bad status", 400, "invalid_request"),
        ("unknown field", 400, "invalid_request"),
    ],
)
async def test_bad_callbacks_are_refused_and_change_nothing(
    client: Client, settings: Settings, sync_redis: redis.Redis, case: str, status: int, code: str
) -> None:
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice")
    before = _counters(sync_redis, activity_id)
    signer = PaymentSignature(settings.payment.secret, 300)
    body = {"event_id": "ev-x", "order_id": order_id, "amount_cents": PRICE, "status": "SUCCESS"}
    signature: str | None = None
    if case == "amount mismatch":
        body["amount_cents"] = PRICE - 1
    elif case == "unknown order":
        body["order_id"] = f"{activity_id}.{'0' * 20}"
    elif case == "malformed order id":
        body["order_id"] = "no-such-thing"
    elif case == "bad status":
        body["status"] = "MAYBE"
    elif case == "unknown field":
        body["coupon"] = "x"
    raw = json.dumps(body).encode()
    if case == "forged":
        signature = PaymentSignature("another-secret-of-enough-length!!", 300).sign(raw)
    elif case == "stale":
        signature = signer.sign(raw, at=int(time.time()) - 301)
    elif case == "future":
        signature = signer.sign(raw, at=int(time.time()) + 301)
    elif case == "missing signature":
        signature = ""
    elif case == "malformed signature":
        signature = "v1=abc"
    elif case == "signature of another body":
        signature = signer.sign(raw + b" ")
    else:
        signature = signer.sign(raw)
    headers = {"Seckill-Signature": signature} if signature else {}
    response = await client.post("/api/v1/payments/notify", data=raw, headers=headers)
    assert response.status == status
    assert (await response.json())["error"]["code"] == code
    assert _counters(sync_redis, activity_id) == before
    assert (await _order(client, settings, order_id, "alice"))["status"] == "reserved"
    # the refused event id was not burnt: a correct callback with it still pays
    if status != 401:
        fine = await _notify(client, settings, order_id, "ev-x")
        assert await fine.json() == {"result": "paid"}


async def test_cancel_returns_the_stock_once_and_only_for_the_owner(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(client, settings, stock=1)
    order_id = await _buy(client, settings, activity_id, "alice")
    sold_out = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, "bob", "k"),
    )
    assert (await sold_out.json())["error"]["code"] == "sold_out"

    url = f"/api/v1/orders/{order_id}/cancel"
    theirs = await client.post(url, headers=user_headers(settings, "bob"))
    assert theirs.status == 404, "someone else's order does not exist for you"
    mine = await client.post(url, headers=user_headers(settings, "alice"))
    assert mine.status == 200
    assert (await mine.json())["status"] == "cancelled"
    twice = await client.post(url, headers=user_headers(settings, "alice"))
    assert twice.status == 200, "a retried cancel answers the cancelled order again"
    assert (await twice.json())["status"] == "cancelled"
    theirs_again = await client.post(url, headers=user_headers(settings, "bob"))
    assert theirs_again.status == 404
    counters = _counters(sync_redis, activity_id)
    assert counters["available"] == 1 and counters["released"] == 1 and counters["reserved"] == 0

    unknown = await client.post(
        f"/api/v1/orders/{activity_id}.{'0' * 20}/cancel", headers=user_headers(settings, "alice")
    )
    assert unknown.status == 404
    # the returned unit is back on sale at once, for someone who was told sold_out
    again = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, "bob", "k2"),
    )
    assert again.status == 202
    # and the limit counts live orders only: alice may buy again after cancelling
    assert sync_redis.hget(keys.holders(activity_id), "alice") is None


async def test_a_late_payment_is_refund_required_and_changes_nothing(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice")
    await _expire_now(sync_redis, client, order_id)
    assert (await _order(client, settings, order_id, "alice"))["status"] == "expired"
    before = _counters(sync_redis, activity_id)
    response = await _notify(client, settings, order_id, "ev-late")
    assert await response.json() == {"result": "refund_required"}
    assert _counters(sync_redis, activity_id) == before
    assert (await _order(client, settings, order_id, "alice"))["status"] == "expired"

    cancelled = await _buy(client, settings, activity_id, "carol")
    await client.post(f"/api/v1/orders/{cancelled}/cancel", headers=user_headers(settings, "carol"))
    response = await _notify(client, settings, cancelled, "ev-c")
    assert await response.json() == {"result": "refund_required"}


async def test_payment_racing_its_expiry_ends_in_exactly_one(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """Invariant: a payment racing its own expiry ends in exactly one of paid or expired."""
    from seckill.clock import parse_rfc3339

    count = 60
    # 3 s: the orders and their deadlines are read back well before the first deadline, even
    # on a busy machine
    activity_id = await _activity(client, settings, stock=count, payment_timeout_s=3)
    orders = await asyncio.gather(
        *(_buy(client, settings, activity_id, f"u{n}") for n in range(count))
    )
    deadlines = [
        parse_rfc3339((await _order(client, settings, o, f"u{n}"))["expires_at"]) / 1000
        for n, o in enumerate(orders)
    ]
    sweeper = Sweeper(client.server.app[SERVICES].stock, interval_s=0.01)
    stop = asyncio.Event()
    sweeping = asyncio.create_task(sweeper.run(stop))

    async def pay_at(n: int) -> str:
        # from 250 ms before to 250 ms after this order's own deadline: wide enough that a
        # late event loop on a busy machine still lands payments on both sides of it
        await asyncio.sleep(max(0.0, deadlines[n] - 0.25 + 0.5 * n / count - time.time()))
        response = await _notify(client, settings, orders[n], f"ev-{n}")
        return str((await response.json())["result"])

    results = await asyncio.gather(*(pay_at(n) for n in range(count)))
    await asyncio.sleep(0.3)
    stop.set()
    await sweeping
    statuses = [
        (await _order(client, settings, o, f"u{n}"))["status"] for n, o in enumerate(orders)
    ]
    for result, status in zip(results, statuses, strict=True):
        assert (result, status) in {("paid", "paid"), ("refund_required", "expired")}
    assert {"paid", "refund_required"} <= set(results), "both sides of the race were reached"
    counters = _counters(sync_redis, activity_id)
    assert counters["paid"] == results.count("paid")
    assert counters["released"] == results.count("refund_required")
    assert counters["available"] + counters["paid"] + counters["reserved"] == count
    assert counters["reserved"] == 0


async def test_unpaid_reservations_expire_within_two_seconds(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(client, settings, payment_timeout_s=1)
    order_id = await _buy(client, settings, activity_id, "alice")
    deadline = (await _order(client, settings, order_id, "alice"))["expires_at"]
    stop = asyncio.Event()
    sweeper = Sweeper(client.server.app[SERVICES].stock, interval_s=settings.sweeper.interval_s)
    sweeping = asyncio.create_task(sweeper.run(stop))
    try:
        while (await _order(client, settings, order_id, "alice"))["status"] == "reserved":
            # within the per-user order-read bucket (limits.toml [orders]: burst 10, 2/s)
            await asyncio.sleep(0.2)
        expired_at = time.time()
    finally:
        stop.set()
        await sweeping
    from seckill.clock import parse_rfc3339

    assert expired_at - parse_rfc3339(deadline) / 1000 < 2.0
    assert _counters(sync_redis, activity_id)["available"] == 10


async def test_report_is_consistent_and_reconcile_catches_a_lost_row(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(client, settings, stock=20, per_user_limit=2)
    orders = [await _buy(client, settings, activity_id, f"u{n}", 1 + n % 2) for n in range(8)]
    await _notify(client, settings, orders[0], "ev-0", amount=PRICE)
    await client.post(f"/api/v1/orders/{orders[1]}/cancel", headers=user_headers(settings, "u1"))
    await _expire_now(sync_redis, client, orders[2])

    url = f"/admin/v1/activities/{activity_id}/report"
    down = await (await client.get(url, headers=admin_headers(settings))).json()
    assert down["writer_alive"] is False and down["consistent"] is False
    assert "writer not running" in down["problems"] and "sweeper not running" in down["problems"]
    for loop in ("writer", "sweeper"):  # as the supervisor's heartbeats would say
        sync_redis.set(keys.heartbeat(loop), "test", ex=120)
    pending = await (await client.get(url, headers=admin_headers(settings))).json()
    assert pending["orders_pending_write"] == 8 and pending["orders_in_store"] == 0
    assert pending["consistent"] is True, pending["problems"]

    services = client.server.app[SERVICES]
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    report = await (await client.get(url, headers=admin_headers(settings))).json()
    assert report == {
        "activity_id": activity_id,
        "initial_stock": 20,
        "available": 20 - 12 + 2 + 1,
        "reserved": 12 - 1 - 2 - 1,
        "paid": 1,
        "released": 3,
        "orders_created": 8,
        "orders_in_store": 8,
        "orders_pending_write": 0,
        "changes_pending_write": 0,
        "dead_letters": 0,
        "writer_alive": True,
        "sweeper_alive": True,
        "orders_checked": True,
        "consistent": True,
        "problems": [],
    }
    assert (await client.get(url)).status == 401
    assert (
        await client.get("/admin/v1/activities/nope/report", headers=admin_headers(settings))
    ).status == 404

    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(SECKILL_REDIS_URL=settings.redis.url, SECKILL_DATABASE_URL=settings.database_url)
    command = [sys.executable, "-m", "seckill", "reconcile", activity_id]
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["consistent"] is True

    # lose one stored row behind everyone's back: both the endpoint and the CLI must say so
    path = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM orders WHERE order_id = ?", (orders[3],))
    broken = await (await client.get(url, headers=admin_headers(settings))).json()
    assert broken["consistent"] is False and broken["orders_in_store"] == 7
    drift = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert drift.returncode == 1
    assert json.loads(drift.stdout)["consistent"] is False


async def test_several_sweepers_release_each_order_exactly_once(
    client: Client, settings: Settings, sync_redis: redis.Redis, redis_url: str
) -> None:
    """Invariant: sweepers in several processes at once give each unit back exactly once."""
    from seckill import connections
    from seckill.scripts import Coalescer, Scripts
    from seckill.stock import Stock

    activity_id = await _activity(client, settings, stock=40, per_user_limit=2)
    orders = [await _buy(client, settings, activity_id, f"u{n}", 1 + n % 2) for n in range(20)]
    for order_id in orders:  # every deadline passes at once
        import msgpack

        record = msgpack.unpackb(sync_redis.hget(keys.orders(activity_id), order_id), raw=False)
        record["expires_at"] = int(time.time() * 1000) - 1
        sync_redis.hset(keys.orders(activity_id), order_id, msgpack.packb(record))
        sync_redis.zadd(keys.deadlines(activity_id), {order_id: record["expires_at"]})
    clients = [connections.connect(settings.redis) for _ in range(3)]
    sweepers = [
        Sweeper(Stock(c, Scripts.from_dir(), Coalescer(c, max_batch=8, in_flight=1), 90_000))
        for c in clients
    ]
    expired = await asyncio.gather(*(s.sweep() for s in sweepers))
    for c in clients:
        await connections.close(c)
    assert sum(expired) == 20, f"each order expired by exactly one sweeper: {expired}"
    counters = _counters(sync_redis, activity_id)
    assert counters["released"] == 30 and counters["available"] == 40
    assert counters["reserved"] == 0
    changes = sync_redis.xlen(keys.changes(activity_id))
    assert changes == 20, "one expiry transition per order"
