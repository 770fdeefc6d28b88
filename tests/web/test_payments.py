"""Payment events are bound to their order and payload: an event id never answers for another."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from seckill import keys
from seckill.auth import PaymentSignature
from seckill.settings import Settings
from tests.helpers import activity_body, admin_headers, user_headers

pytestmark = pytest.mark.contract

Client = TestClient[Any, Any]
PRICE = 1000


async def _activity(client: Client, settings: Settings) -> str:
    body = activity_body(price_cents=PRICE, stock=10, per_user_limit=2)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201
    return str(body["id"])


async def _buy(client: Client, settings: Settings, activity_id: str, user: str) -> str:
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, user, f"key-{user}"),
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
    raw: bytes | None = None,
) -> tuple[int, Any]:
    if raw is None:
        raw = json.dumps(
            {"event_id": event_id, "order_id": order_id, "amount_cents": amount, "status": status}
        ).encode()
    signature = PaymentSignature(settings.payment.secret, 300).sign(raw)
    response = await client.post(
        "/api/v1/payments/notify", data=raw, headers={"Seckill-Signature": signature}
    )
    return response.status, await response.json()


def _paid(sync_redis: redis.Redis, activity_id: str) -> int:
    return int(sync_redis.hget(keys.counters(activity_id), "paid") or 0)


async def test_an_event_id_reused_on_another_order_is_a_conflict_never_its_answer(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """Invariant: one event id answers for one order only; another order is never touched."""
    activity_id = await _activity(client, settings)
    first = await _buy(client, settings, activity_id, "alice")
    second = await _buy(client, settings, activity_id, "bob")
    assert await _notify(client, settings, first, "ev-1") == (200, {"result": "paid"})

    status, body = await _notify(client, settings, second, "ev-1")
    assert status == 409 and body["error"]["code"] == "conflict", body
    assert _paid(sync_redis, activity_id) == 1
    order = await client.get(f"/api/v1/orders/{second}", headers=user_headers(settings, "bob"))
    assert (await order.json())["status"] == "reserved", "the other order did not change"

    # on another activity (another Redis Cluster slot) the untagged binding still sees it
    other_activity = await _activity(client, settings)
    third = await _buy(client, settings, other_activity, "carol")
    status, body = await _notify(client, settings, third, "ev-1")
    assert status == 409 and body["error"]["code"] == "conflict"
    assert _paid(sync_redis, other_activity) == 0


async def test_an_event_id_with_another_amount_or_status_is_a_conflict(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice")
    assert await _notify(client, settings, order_id, "ev-f", status="FAILED") == (
        200,
        {"result": "ignored"},
    )
    # SUCCESS reusing the FAILED event's id: the payload differs, refused clearly
    status, body = await _notify(client, settings, order_id, "ev-f")
    assert status == 409 and body["error"]["code"] == "conflict"
    assert _paid(sync_redis, activity_id) == 0

    assert await _notify(client, settings, order_id, "ev-s") == (200, {"result": "paid"})
    status, body = await _notify(client, settings, order_id, "ev-s", amount=PRICE + 1)
    assert status == 409 and body["error"]["code"] == "conflict", "same id, another amount"
    status, body = await _notify(client, settings, order_id, "ev-s", status="FAILED")
    assert status == 409 and body["error"]["code"] == "conflict", "same id, another status"
    assert _paid(sync_redis, activity_id) == 1


async def test_the_same_event_again_replays_its_answer_without_a_second_effect(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice")
    assert await _notify(client, settings, order_id, "ev-1") == (200, {"result": "paid"})
    changes = sync_redis.xlen(keys.changes(activity_id))
    assert await _notify(client, settings, order_id, "ev-1") == (200, {"result": "paid"})
    # the same content with other whitespace and key order is the same event
    spaced = json.dumps(
        {"status": "SUCCESS", "amount_cents": PRICE, "order_id": order_id, "event_id": "ev-1"},
        indent=2,
    ).encode()
    assert await _notify(client, settings, order_id, "ev-1", raw=spaced) == (
        200,
        {"result": "paid"},
    )
    assert sync_redis.xlen(keys.changes(activity_id)) == changes, "no second effect"
    assert _paid(sync_redis, activity_id) == 1


async def test_failed_then_success_under_a_new_event_id_pays(
    client: Client, settings: Settings
) -> None:
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice")
    assert await _notify(client, settings, order_id, "ev-a", status="FAILED") == (
        200,
        {"result": "ignored"},
    )
    assert await _notify(client, settings, order_id, "ev-b") == (200, {"result": "paid"})


async def test_a_refused_callback_does_not_burn_its_event_id(
    client: Client, settings: Settings
) -> None:
    """A wrong amount (nothing stored) leaves the id free for the corrected callback."""
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice")
    status, body = await _notify(client, settings, order_id, "ev-x", amount=PRICE - 1)
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert await _notify(client, settings, order_id, "ev-x") == (200, {"result": "paid"})


async def test_an_event_answered_before_the_upgrade_still_replays(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """Invariant: an event answered under the old (unbound) key has no second effect."""
    activity_id = await _activity(client, settings)
    order_id = await _buy(client, settings, activity_id, "alice")
    sync_redis.set(keys.payment_event(activity_id, "old-ev"), "refund_required")
    assert await _notify(client, settings, order_id, "old-ev") == (
        200,
        {"result": "refund_required"},
    )
    assert _paid(sync_redis, activity_id) == 0
    assert await _notify(client, settings, order_id, "new-ev") == (200, {"result": "paid"})
