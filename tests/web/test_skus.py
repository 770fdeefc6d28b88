"""SKUs: each SKU's stock is its own and never oversold; the per-user limit spans the activity."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import msgpack
import pytest
import redis
from aiohttp.test_utils import TestClient

from seckill import keys
from seckill.settings import Settings
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, loops_alive, redis_commands, user_headers

pytestmark = pytest.mark.contract

Client = TestClient[Any, Any]
SKUS = [
    {"sku_id": "red", "title": "Red", "price_cents": 1000, "stock": 5},
    {"sku_id": "blue", "title": "Blue", "price_cents": 1200, "stock": 8},
    {"sku_id": "gold", "title": "Gold", "price_cents": 5000, "stock": 3},
]


def sku_body(**overrides: Any) -> dict[str, Any]:
    """An activity in the list form (no sku_id/price_cents/stock of its own)."""
    body = activity_body(**overrides)
    for name in ("sku_id", "price_cents", "stock"):
        body.pop(name, None)
    body.setdefault("skus", SKUS)
    return body


async def create(client: Client, settings: Settings, body: dict[str, Any]) -> str:
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201, await response.text()
    return str(body["id"])


async def buy(
    client: Client, settings: Settings, activity_id: str, user: str, key: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1, **body},
        headers=user_headers(settings, user, key),
    )
    return response.status, await response.json()


def stream_orders(sync_redis: redis.Redis, activity_id: str) -> list[dict[str, Any]]:
    entries = sync_redis.xrange(keys.stream(activity_id))
    return [msgpack.unpackb(fields[b"o"], raw=False) for _, fields in entries]


async def test_k_skus_sold_concurrently_never_oversell_and_the_limit_spans_skus(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    limit, users = 2, 120
    activity_id = await create(client, settings, sku_body(per_user_limit=limit))
    rng = random.Random(11)
    # every user fires three single-unit orders at once, each for a random SKU
    plan = [(f"u{u}", f"k{n}", rng.choice(SKUS)["sku_id"]) for u in range(users) for n in range(3)]
    rng.shuffle(plan)
    results = await asyncio.gather(
        *(buy(client, settings, activity_id, user, key, sku_id=sku) for user, key, sku in plan)
    )
    codes = Counter(body["error"]["code"] for status, body in results if status != 202)
    assert set(codes) <= {"sold_out", "limit_reached"}, codes

    orders = stream_orders(sync_redis, activity_id)
    assert len(orders) == sum(1 for status, _ in results if status == 202)
    sold = Counter(o["sku_id"] for o in orders)
    left = {k.decode(): int(v) for k, v in sync_redis.hgetall(keys.sku_stock(activity_id)).items()}
    for sku in SKUS:
        assert sold[sku["sku_id"]] + left[sku["sku_id"]] == sku["stock"], "per SKU: no oversell"
        assert left[sku["sku_id"]] == 0, "N >> stock: every SKU sells out"
        assert all(
            o["price_cents"] == sku["price_cents"] for o in orders if o["sku_id"] == sku["sku_id"]
        ), "each order records its SKU's price"
    per_user = Counter(o["user_id"] for o in orders)
    assert max(per_user.values()) <= limit, "the per-user limit counts across SKUs"
    holders = {k.decode(): int(v) for k, v in sync_redis.hgetall(keys.holders(activity_id)).items()}
    assert holders == dict(per_user)
    assert int(sync_redis.get(keys.stock(activity_id))) == 0

    loops_alive(sync_redis)

    report = await client.get(
        f"/admin/v1/activities/{activity_id}/report", headers=admin_headers(settings)
    )
    body = await report.json()
    assert body["consistent"], body["problems"]
    assert {s["sku_id"]: s["held"] for s in body["skus"]} == dict(sold)

    shown = await (await client.get(f"/api/v1/activities/{activity_id}")).json()
    assert [(s["sku_id"], s["stock_left"]) for s in shown["skus"]] == [
        ("red", 0),
        ("blue", 0),
        ("gold", 0),
    ]
    assert shown["state"] == "sold_out"


async def test_one_sku_sold_out_answers_without_redis_while_another_sells(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    skus = [dict(SKUS[0], stock=1), dict(SKUS[1], stock=5)]
    activity_id = await create(client, settings, sku_body(skus=skus, per_user_limit=1))
    assert (await buy(client, settings, activity_id, "winner", "k", sku_id="red"))[0] == 202

    catalog = client.server.app[SERVICES].catalog
    entry = catalog.entries()[activity_id]
    deadline = asyncio.get_running_loop().time() + 15
    while entry.holders is None or entry.holders_version != entry.orders_created:
        assert asyncio.get_running_loop().time() < deadline, "no sold-out mark for red"
        await asyncio.sleep(0.02)
        entry = catalog.entries()[activity_id]
    assert entry.sku_left == {"red": 0, "blue": 5}

    with redis_commands(sync_redis) as commands:
        status, body = await buy(client, settings, activity_id, "late", "k", sku_id="red")
    assert (status, body["error"]["code"]) == (409, "sold_out")
    asked = [c for c in commands if any(b"late" in arg for arg in c)]
    assert asked == [], "a sold-out SKU is answered without a script call"

    assert (await buy(client, settings, activity_id, "late", "k2", sku_id="blue"))[0] == 202
    # the winner's retry of the sold-out SKU still reaches Redis and replays its 202
    status, body = await buy(client, settings, activity_id, "winner", "k", sku_id="red")
    assert status == 202

    shown = await (await client.get(f"/api/v1/activities/{activity_id}")).json()
    assert shown["state"] == "live"
    assert {s["sku_id"]: s["stock_left"] for s in shown["skus"]} == {"red": 0, "blue": 4}
    metrics = await (await client.get("/metrics")).text()
    assert f'seckill_sku_stock_left{{activity="{activity_id}",sku="red"}} 0.0' in metrics


async def test_cancel_puts_stock_back_on_its_own_sku(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = await create(client, settings, sku_body(per_user_limit=2))
    status, body = await buy(client, settings, activity_id, "u", "k", sku_id="gold", quantity=2)
    assert status == 202
    response = await client.post(
        f"/api/v1/orders/{body['order_id']}/cancel", headers=user_headers(settings, "u")
    )
    assert response.status == 200
    left = {k.decode(): int(v) for k, v in sync_redis.hgetall(keys.sku_stock(activity_id)).items()}
    assert left == {"red": 5, "blue": 8, "gold": 3}
    loops_alive(sync_redis)
    report = await client.get(
        f"/admin/v1/activities/{activity_id}/report", headers=admin_headers(settings)
    )
    body = await report.json()
    assert body["consistent"], body["problems"]
    assert {s["sku_id"]: s["released"] for s in body["skus"]}["gold"] == 2


async def test_the_single_form_is_unchanged_on_the_wire(client: Client, settings: Settings) -> None:
    body = activity_body()
    activity_id = await create(client, settings, body)
    shown = await (await client.get(f"/api/v1/activities/{activity_id}")).json()
    assert set(shown) == {
        "id",
        "sku_id",
        "title",
        "price_cents",
        "starts_at",
        "ends_at",
        "state",
        "stock_left",
    }
    status, order = await buy(client, settings, activity_id, "u", "k")
    assert status == 202
    # naming the only SKU is the same order (same idempotency fingerprint)
    status, again = await buy(client, settings, activity_id, "u", "k", sku_id=body["sku_id"])
    assert status == 202 and again["order_id"] == order["order_id"]


def _dump(sync_redis: redis.Redis) -> dict[bytes, Any]:
    """Every key and its value: the state a refused request must leave untouched."""
    state: dict[bytes, Any] = {}
    for key in sync_redis.scan_iter(count=1000):
        kind = sync_redis.type(key)
        if kind == b"string":
            state[key] = sync_redis.get(key)
        elif kind == b"hash":
            state[key] = sync_redis.hgetall(key)
        elif kind == b"stream":
            state[key] = sync_redis.xrange(key)
        elif kind == b"zset":
            state[key] = sync_redis.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            state[key] = sync_redis.smembers(key)
        elif kind == b"list":
            state[key] = sync_redis.lrange(key, 0, -1)
    return state


_ADDRESS = {"name": "Li Lei", "phone": "13812341234", "region": "Beijing", "detail": "1 Road"}


@pytest.mark.parametrize(
    "body",
    [
        {"sku_id": "purple"},  # unknown SKU
        {},  # SKU missing where there are several
        {"sku_id": 7},
        {"sku_id": "red", "address": "Beijing"},
        {"sku_id": "red", "address": dict(_ADDRESS, phone="12345")},
        {"sku_id": "red", "address": dict(_ADDRESS, phone="+0123456789")},
        {"sku_id": "red", "address": dict(_ADDRESS, name="x" * 51)},
        {"sku_id": "red", "address": dict(_ADDRESS, detail="y" * 201)},
        {"sku_id": "red", "address": dict(_ADDRESS, detail="a\nb")},
        {"sku_id": "red", "address": dict(_ADDRESS, region="")},
        {"sku_id": "red", "address": dict(_ADDRESS, zip="100000")},
        {"sku_id": "red", "address": {k: v for k, v in _ADDRESS.items() if k != "phone"}},
        {"sku_id": "red", "address": dict(_ADDRESS, name=["Li"])},
        {"sku_id": "red", "quantity": 3},  # over the limit
    ],
)
async def test_bad_order_bodies_are_400_and_change_nothing(
    client: Client, settings: Settings, sync_redis: redis.Redis, body: dict[str, Any]
) -> None:
    activity_id = await create(client, settings, sku_body(per_user_limit=2))
    before = _dump(sync_redis)
    status, answer = await buy(client, settings, activity_id, "u", "k", **body)
    assert status == 400
    assert set(answer) == {"error"} and answer["error"]["code"] == "invalid_request"
    for value in _ADDRESS.values():
        assert value not in answer["error"]["message"], "an error never echoes personal data"
    assert _dump(sync_redis) == before, "a refused order leaves Redis as it was"


async def test_admin_refuses_a_malformed_sku_list(client: Client, settings: Settings) -> None:
    for skus in ([], [SKUS[0], SKUS[0]], [dict(SKUS[0], stock=-1)], [dict(SKUS[0], x=1)]):
        response = await client.post(
            "/admin/v1/activities", json=sku_body(skus=skus), headers=admin_headers(settings)
        )
        assert response.status == 400, skus
    both = sku_body() | {"sku_id": "x"}
    response = await client.post("/admin/v1/activities", json=both, headers=admin_headers(settings))
    assert response.status == 400
