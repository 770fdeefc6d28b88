"""Invariant: stock K, N >> K concurrent buyers -> exactly K accepted, never oversold."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from typing import Any

import msgpack
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys
from seckill.settings import Settings
from seckill.web.app import create_app
from tests.helpers import activity_body, admin_headers, user_headers

pytestmark = pytest.mark.contract


async def _create(client: TestClient[Any, Any], settings: Settings, **overrides: Any) -> str:
    body = activity_body(**overrides)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201, await response.text()
    return str(body["id"])


def _stream_orders(sync_redis: redis.Redis, activity_id: str) -> list[dict[str, Any]]:
    entries = sync_redis.xrange(keys.stream(activity_id))
    return [msgpack.unpackb(fields[b"o"], raw=False) for _, fields in entries]


def _assert_invariants(
    sync_redis: redis.Redis, activity_id: str, stock: int, limit: int, accepted: dict[str, int]
) -> None:
    orders = _stream_orders(sync_redis, activity_id)
    sold = sum(o["quantity"] for o in orders)
    assert sold == sum(accepted.values()), "every 202 is one stream entry, and only those"
    assert len({o["order_id"] for o in orders}) == len(orders), "no order queued twice"
    left = int(sync_redis.get(keys.stock(activity_id)) or 0)
    assert left >= 0, "stock never goes negative"
    assert left + sold == stock, "initial = available + reserved"
    per_user: Counter[str] = Counter()
    for order in orders:
        per_user[order["user_id"]] += order["quantity"]
    assert max(per_user.values(), default=0) <= limit, "no user over the limit"
    assert {u: q for u, q in per_user.items()} == accepted
    holders = {k.decode(): int(v) for k, v in sync_redis.hgetall(keys.holders(activity_id)).items()}
    assert holders == dict(per_user)


async def test_exactly_k_of_n_single_unit_buyers_win(
    client: TestClient[Any, Any], settings: Settings, sync_redis: redis.Redis
) -> None:
    stock, buyers = 50, 1000
    activity_id = await _create(client, settings, stock=stock, per_user_limit=1)

    async def buy(user: str) -> tuple[str, int, dict[str, Any]]:
        response = await client.post(
            f"/api/v1/activities/{activity_id}/orders",
            json={"quantity": 1},
            headers=user_headers(settings, user, f"k-{user}"),
        )
        return user, response.status, await response.json()

    results = await asyncio.gather(*(buy(f"user{i}") for i in range(buyers)))
    statuses = Counter(status for _, status, _ in results)
    assert statuses == {202: stock, 409: buyers - stock}
    assert {body["error"]["code"] for _, status, body in results if status == 409} == {"sold_out"}
    accepted = {user: 1 for user, status, _ in results if status == 202}
    _assert_invariants(sync_redis, activity_id, stock, 1, accepted)
    assert int(sync_redis.get(keys.stock(activity_id))) == 0


async def test_multi_unit_limits_and_replays_never_oversell(
    client: TestClient[Any, Any], settings: Settings, sync_redis: redis.Redis
) -> None:
    stock, limit, users = 40, 3, 60
    activity_id = await _create(client, settings, stock=stock, per_user_limit=limit)
    rng = random.Random(7)
    # every user fires several orders at once; each request is sent twice (a replayed key)
    plan = [
        (f"u{u}", f"key{u}-{n}", rng.randint(1, limit))
        for u in range(users)
        for n in range(rng.randint(1, 4))
    ]
    requests = plan + plan
    rng.shuffle(requests)

    async def buy(user: str, key: str, quantity: int) -> tuple[str, str, int, int, dict[str, Any]]:
        response = await client.post(
            f"/api/v1/activities/{activity_id}/orders",
            json={"quantity": quantity},
            headers=user_headers(settings, user, key),
        )
        return user, key, quantity, response.status, await response.json()

    results = await asyncio.gather(*(buy(*r) for r in requests))
    by_key: dict[tuple[str, str], set[str]] = defaultdict(set)
    accepted: Counter[str] = Counter()
    for user, key, quantity, status, body in results:
        assert status in (202, 409), body
        if status == 202:
            by_key[user, key].add(body["order_id"])
            assert body["quantity"] == quantity
        else:
            assert body["error"]["code"] in {"sold_out", "limit_reached"}
    for (user, _key), order_ids in by_key.items():
        assert len(order_ids) == 1, "a replayed key answers the same order, never a second one"
        order = sync_redis.hget(keys.orders(activity_id), next(iter(order_ids)))
        accepted[user] += msgpack.unpackb(order, raw=False)["quantity"]
    _assert_invariants(sync_redis, activity_id, stock, limit, dict(accepted))
    assert sum(accepted.values()) <= stock


async def test_two_gateways_sharing_redis_never_oversell(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    stock, buyers = 25, 400
    async with (
        TestClient(TestServer(create_app(settings))) as first,
        TestClient(TestServer(create_app(settings))) as second,
    ):
        activity_id = await _create(first, settings, stock=stock)

        async def buy(i: int) -> int:
            gateway = first if i % 2 else second
            # a 503 (a busy machine's Redis timeout) is retried with the same key, as a client
            # does: safe, and the invariant still counts every answer
            for _ in range(5):
                response = await gateway.post(
                    f"/api/v1/activities/{activity_id}/orders",
                    json={"quantity": 1},
                    headers=user_headers(settings, f"user{i}", "k"),
                )
                if response.status != 503:
                    break
                await asyncio.sleep(0.2)
            return response.status

        statuses = Counter(await asyncio.gather(*(buy(i) for i in range(buyers))))
    assert statuses == {202: stock, 409: buyers - stock}
    accepted = {o["user_id"]: 1 for o in _stream_orders(sync_redis, activity_id)}
    _assert_invariants(sync_redis, activity_id, stock, 1, accepted)
