"""Member tiers: early access, their own limit and price; payments must match the price sold at."""

from __future__ import annotations

import json
from typing import Any

import jwt
import msgpack
import redis
from aiohttp.test_utils import TestClient

from seckill import cli, keys
from seckill.auth import PaymentSignature, UserAuth
from seckill.settings import Settings
from tests.helpers import activity_body, admin_headers, loops_alive, rfc3339

Client = TestClient[Any, Any]
PRICE, MEMBER_PRICE = 1000, 700


def tier_headers(settings: Settings, user: str, tier: str, key: str = "k") -> dict[str, str]:
    token = UserAuth(settings.jwt.secret).mint(user, 600, tier)
    return {"Authorization": f"Bearer {token}", "Idempotency-Key": key}


async def create(client: Client, settings: Settings, **overrides: Any) -> str:
    body = activity_body(
        price_cents=PRICE,
        stock=10,
        per_user_limit=1,
        starts_at=rfc3339(3600),  # the public sale opens in an hour
        ends_at=rfc3339(7200),
        tiers={
            "gold": {"starts_at": rfc3339(-60), "per_user_limit": 3, "price_cents": MEMBER_PRICE}
        },
        **overrides,
    )
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201, await response.text()
    return str(body["id"])


async def order(
    client: Client, settings: Settings, activity_id: str, user: str, tier: str, q: int, key: str
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": q},
        headers=tier_headers(settings, user, tier, key),
    )
    return response.status, await response.json()


async def test_a_tier_buys_early_within_its_own_limit_at_its_price(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await create(client, settings)
    status, body = await order(client, settings, activity_id, "member", "gold", 2, "a")
    assert status == 202, body
    status, again = await order(client, settings, activity_id, "member", "gold", 1, "b")
    assert status == 202, again
    status, over = await order(client, settings, activity_id, "member", "gold", 1, "c")
    assert (status, over["error"]["code"]) == (409, "limit_reached"), "the tier's limit is 3"
    status, _ = await order(client, settings, activity_id, "other", "gold", 4, "d")
    assert status == 400, "quantity above the tier's limit is a bad request"

    # no tier, or a tier the activity does not list: the defaults (not open for an hour)
    for tier in ("", "silver"):
        status, early = await order(client, settings, activity_id, f"plain-{tier}", tier, 1, "e")
        assert (status, early["error"]["code"]) == (409, "not_started"), tier
        status, _ = await order(client, settings, activity_id, f"plain-{tier}", tier, 2, "f")
        assert status == 400, "the default limit is 1"

    record = msgpack.unpackb(sync_redis.hget(keys.orders(activity_id), body["order_id"]), raw=False)
    assert record["price_cents"] == MEMBER_PRICE and record["tier"] == "gold"
    shown = await client.get(
        f"/api/v1/orders/{body['order_id']}", headers=tier_headers(settings, "member", "gold")
    )
    seen = await shown.json()
    assert seen["price_cents"] == MEMBER_PRICE and seen["tier"] == "gold"

    # the report holds each user to their own tier's limit: 3 units for gold is within it
    loops_alive(sync_redis)
    report = await client.get(
        f"/admin/v1/activities/{activity_id}/report", headers=admin_headers(settings)
    )
    assert (await report.json())["consistent"], await report.text()
    shown = await (await client.get(f"/api/v1/activities/{activity_id}")).json()
    assert shown["state"] == "upcoming" and shown["tiers"]["gold"]["price_cents"] == MEMBER_PRICE


async def _notify(
    client: Client, settings: Settings, order_id: str, event_id: str, amount: int
) -> tuple[int, dict[str, Any]]:
    raw = json.dumps(
        {"event_id": event_id, "order_id": order_id, "amount_cents": amount, "status": "SUCCESS"}
    ).encode()
    signature = PaymentSignature(settings.payment.secret, 300).sign(raw)
    response = await client.post(
        "/api/v1/payments/notify",
        data=raw,
        headers={"Seckill-Signature": signature, "Content-Type": "application/json"},
    )
    return response.status, await response.json()


async def test_a_payment_at_the_non_member_price_is_refused_and_changes_nothing(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await create(client, settings)
    status, body = await order(client, settings, activity_id, "member", "gold", 2, "a")
    assert status == 202
    order_id = body["order_id"]
    before = (
        sync_redis.hget(keys.orders(activity_id), order_id),
        sync_redis.hgetall(keys.counters(activity_id)),
        sync_redis.xlen(keys.changes(activity_id)),
    )
    status, refused = await _notify(client, settings, order_id, "ev1", 2 * PRICE)
    assert (status, refused["error"]["code"]) == (400, "invalid_request")
    after = (
        sync_redis.hget(keys.orders(activity_id), order_id),
        sync_redis.hgetall(keys.counters(activity_id)),
        sync_redis.xlen(keys.changes(activity_id)),
    )
    assert after == before, "a refused payment changes nothing"
    assert await _notify(client, settings, order_id, "ev2", 2 * MEMBER_PRICE) == (
        200,
        {"result": "paid"},
    )


async def test_sku_price_is_recorded_and_charged(client: Client, settings: Settings) -> None:
    body = activity_body(per_user_limit=2)
    for name in ("sku_id", "price_cents", "stock"):
        body.pop(name)
    body["skus"] = [
        {"sku_id": "s", "title": "Small", "price_cents": 300, "stock": 5},
        {"sku_id": "l", "title": "Large", "price_cents": 900, "stock": 5},
    ]
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201
    response = await client.post(
        f"/api/v1/activities/{body['id']}/orders",
        json={"quantity": 2, "sku_id": "l"},
        headers=tier_headers(settings, "u", ""),
    )
    order_id = (await response.json())["order_id"]
    assert (await _notify(client, settings, order_id, "e1", 2 * 300))[0] == 400
    assert await _notify(client, settings, order_id, "e2", 2 * 900) == (200, {"result": "paid"})


def test_token_command_carries_the_tier(capsys: Any, monkeypatch: Any) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("SECKILL_"):
            monkeypatch.delenv(name)
    assert cli.main(["token", "alice", "--tier", "gold"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["tier"] == "gold"


async def test_terms_from_a_replaced_definition_are_refused_not_sold(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await create(client, settings)
    # the definition in Redis changes behind this gateway's cached copy
    sync_redis.hset(keys.meta(activity_id), "version", "another-definition")
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=tier_headers(settings, "member", "gold"),
    )
    assert response.status == 503 and "Retry-After" in response.headers
    assert sync_redis.hlen(keys.orders(activity_id)) == 0, "nothing sold under stale terms"
    assert int(sync_redis.get(keys.stock(activity_id))) == 10


async def test_an_order_that_left_redis_is_still_charged_its_own_price(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    from seckill.orders.retirement import Retirer
    from seckill.orders.writer import Writer, WriterConfig
    from seckill.web.state import SERVICES

    activity_id = await create(client, settings)
    status, body = await order(client, settings, activity_id, "member", "gold", 2, "a")
    assert status == 202
    order_id = body["order_id"]
    cancelled = await client.post(
        f"/api/v1/orders/{order_id}/cancel", headers=tier_headers(settings, "member", "gold")
    )
    assert cancelled.status == 200
    services = client.server.app[SERVICES]
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    assert await Retirer(services.redis, services.store, grace_s=0).retire_once() == 1
    assert not sync_redis.hexists(keys.orders(activity_id), order_id), "left Redis"

    # a late SUCCESS must still match the member price the store recorded
    status, refused = await _notify(client, settings, order_id, "late1", 2 * PRICE)
    assert (status, refused["error"]["code"]) == (400, "invalid_request")
    assert await _notify(client, settings, order_id, "late2", 2 * MEMBER_PRICE) == (
        200,
        {"result": "refund_required"},
    )


async def test_an_activity_open_to_a_tier_can_no_longer_be_replaced(
    client: Client, settings: Settings
) -> None:
    body = activity_body(
        starts_at=rfc3339(3600),
        ends_at=rfc3339(7200),
        tiers={"gold": {"starts_at": rfc3339(-60)}},
    )
    first = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert first.status == 201
    again = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert again.status == 409, "gold members may already be buying: the terms are fixed"
