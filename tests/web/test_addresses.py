"""Addresses: sealed before the script, never in clear in Redis, the database or the logs."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys, personal
from seckill.auth import PaymentSignature
from seckill.orders.writer import Writer, WriterConfig
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, loops_alive, user_headers

Client = TestClient[Any, Any]
DATA_KEY = personal.new_key("t1")


def address(n: int) -> dict[str, str]:
    """A distinct, greppable address per buyer."""
    return {
        "name": f"李雷{n:03d}",
        "phone": f"1390000{n:04d}",
        "region": f"北京市海淀区{n:03d}",
        "detail": f"中关村大街{n:03d}号楼",
    }


def redis_bytes(sync_redis: redis.Redis) -> bytes:
    """Every key and every value Redis holds (streams entry by entry), as one blob."""
    parts: list[bytes] = []
    for key in sync_redis.scan_iter(count=1000):
        parts.append(key)
        kind = sync_redis.type(key)
        if kind == b"string":
            parts.append(sync_redis.get(key) or b"")
        elif kind == b"hash":
            for field, value in sync_redis.hgetall(key).items():
                parts += [field, value]
        elif kind == b"stream":
            for _, fields in sync_redis.xrange(key):
                for field, value in fields.items():
                    parts += [field, value]
        elif kind == b"zset":
            parts += [m for m, _ in sync_redis.zrange(key, 0, -1, withscores=True)]
        elif kind == b"set":
            parts += list(sync_redis.smembers(key))
        elif kind == b"list":
            parts += sync_redis.lrange(key, 0, -1)
    return b"\n".join(parts)


def clear_values(n: int) -> list[bytes]:
    values = address(n)
    return [values[f].encode() for f in ("name", "phone", "region", "detail")]


async def database_bytes(settings: Settings) -> bytes:
    url = settings.database_url
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        rows = []
        for table in ("orders", "order_events", "payment_events"):
            rows += await connection.fetch(f"SELECT t::text FROM {table} t")
        return "\n".join(r[0] for r in rows).encode()
    finally:
        await connection.close()


@pytest.fixture(params=["sqlite", "postgres"])
def keyed(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Settings with a data key, on SQLite and on PostgreSQL."""
    keyed = settings.replace("data", keys=DATA_KEY)
    if request.param == "postgres":
        keyed = keyed.replace("database", url=request.getfixturevalue("postgres_url"))
    return keyed


async def test_a_whole_sale_never_shows_personal_data_in_clear(
    keyed: Settings, sync_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    buyers = 24
    body = activity_body(stock=15, per_user_limit=1, requires_address=True, price_cents=500)
    async with TestClient(TestServer(create_app(keyed))) as client:
        response = await client.post(
            "/admin/v1/activities", json=body, headers=admin_headers(keyed)
        )
        assert response.status == 201
        activity_id = body["id"]

        async def buy(n: int) -> tuple[int, dict[str, Any]]:
            answer = await client.post(
                f"/api/v1/activities/{activity_id}/orders",
                json={"quantity": 1, "address": address(n)},
                headers=user_headers(keyed, f"buyer{n}", "k"),
            )
            return answer.status, await answer.json()

        results = await asyncio.gather(*(buy(n) for n in range(buyers)))
        won = [(n, b["order_id"]) for n, (s, b) in enumerate(results) if s == 202]
        assert len(won) == 15
        # a replay with the same address is the same order; another address is another body
        assert (await buy(won[0][0]))[1]["order_id"] == won[0][1]
        other = await client.post(
            f"/api/v1/activities/{activity_id}/orders",
            json={"quantity": 1, "address": address(999)},
            headers=user_headers(keyed, f"buyer{won[0][0]}", "k"),
        )
        assert other.status == 422

        signer = PaymentSignature(keyed.payment.secret, 300)
        for n, order_id in won[:5]:
            raw = json.dumps(
                {
                    "event_id": f"e{n}",
                    "order_id": order_id,
                    "amount_cents": 500,
                    "status": "SUCCESS",
                }
            ).encode()
            paid = await client.post(
                "/api/v1/payments/notify", data=raw, headers={"Seckill-Signature": signer.sign(raw)}
            )
            assert paid.status == 200
        for n, order_id in won[5:8]:
            cancelled = await client.post(
                f"/api/v1/orders/{order_id}/cancel", headers=user_headers(keyed, f"buyer{n}")
            )
            assert cancelled.status == 200
            assert (await cancelled.json())["address"]["phone"].count("*") == 4

        services = client.server.app[SERVICES]
        await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
        loops_alive(sync_redis)
        report = await client.get(
            f"/admin/v1/activities/{activity_id}/report", headers=admin_headers(keyed)
        )
        report_text = await report.text()
        assert json.loads(report_text)["consistent"], report_text

        # the owner sees the address, phone masked; nobody else sees the order at all
        n, order_id = won[0]
        mine = await (
            await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(keyed, f"buyer{n}"))
        ).json()
        expected = address(n)
        masked = expected["phone"][:3] + "****" + expected["phone"][-4:]
        assert mine["address"] == dict(expected, phone=masked)
        stranger = await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(keyed, "x"))
        assert stranger.status == 404
        stored = await services.store.order(order_id)
        assert stored is not None and stored.address.startswith("sm4gcm:t1:")
        assert stored.address_hash and stored.sku_id == body["sku_id"]

    in_redis = redis_bytes(sync_redis)
    in_database = await database_bytes(keyed)
    in_logs = caplog.text.encode()
    assert b"sm4gcm:t1:" in in_redis and (
        b"sm4gcm:t1:" in in_database or "postgres" in keyed.database_url
    )
    for n in range(buyers):
        for value in clear_values(n):
            assert value not in in_redis, f"buyer {n}: personal data in clear in Redis"
            assert value not in in_database, f"buyer {n}: personal data in clear in the database"
            assert value not in in_logs, f"buyer {n}: personal data in clear in the logs"
            assert value not in report_text.encode()


async def test_a_ciphertext_moved_to_another_order_does_not_open(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    sealer = personal.Sealer(DATA_KEY)
    sealed = sealer.seal(personal.parse_address(address(1)), "act.00000000000000000001")
    assert sealer.open(sealed, "act.00000000000000000001").phone == address(1)["phone"]
    with pytest.raises(personal.DecryptError):
        sealer.open(sealed, "act.00000000000000000002")

    # and in the system: another order's ciphertext pasted into a record is not shown
    keyed = settings.replace("data", keys=DATA_KEY)
    async with TestClient(TestServer(create_app(keyed))) as client:
        body = activity_body(stock=5, per_user_limit=1)
        await client.post("/admin/v1/activities", json=body, headers=admin_headers(keyed))
        ids = []
        for n in (1, 2):
            answer = await client.post(
                f"/api/v1/activities/{body['id']}/orders",
                json={"quantity": 1, "address": address(n)},
                headers=user_headers(keyed, f"u{n}", "k"),
            )
            ids.append((await answer.json())["order_id"])
        orders_key = keys.orders(body["id"])
        first = msgpack.unpackb(sync_redis.hget(orders_key, ids[0]), raw=False)
        second = msgpack.unpackb(sync_redis.hget(orders_key, ids[1]), raw=False)
        second["address"] = first["address"]
        sync_redis.hset(orders_key, ids[1], msgpack.packb(second))
        shown = await (
            await client.get(f"/api/v1/orders/{ids[1]}", headers=user_headers(keyed, "u2"))
        ).json()
        assert shown["address"] is None
        shown = await (
            await client.get(f"/api/v1/orders/{ids[0]}", headers=user_headers(keyed, "u1"))
        ).json()
        assert shown["address"]["name"] == address(1)["name"]


async def test_requires_address_refuses_an_order_without_one(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    keyed = settings.replace("data", keys=DATA_KEY)
    async with TestClient(TestServer(create_app(keyed))) as client:
        body = activity_body(requires_address=True)
        await client.post("/admin/v1/activities", json=body, headers=admin_headers(keyed))
        answer = await client.post(
            f"/api/v1/activities/{body['id']}/orders",
            json={"quantity": 1},
            headers=user_headers(keyed, "u", "k"),
        )
        assert answer.status == 400
        assert (await answer.json())["error"]["code"] == "invalid_request"
        assert sync_redis.hlen(keys.orders(body["id"])) == 0


async def test_without_a_data_key_no_address_is_taken(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    refused = await client.post(
        "/admin/v1/activities",
        json=activity_body(requires_address=True),
        headers=admin_headers(settings),
    )
    assert refused.status == 400
    body = activity_body()
    await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    answer = await client.post(
        f"/api/v1/activities/{body['id']}/orders",
        json={"quantity": 1, "address": address(1)},
        headers=user_headers(settings, "u", "k"),
    )
    assert answer.status == 400
    assert sync_redis.hlen(keys.orders(body["id"])) == 0


async def test_the_owner_still_sees_the_address_once_the_order_left_redis(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    from seckill.orders.retirement import Retirer

    keyed = settings.replace("data", keys=DATA_KEY)
    async with TestClient(TestServer(create_app(keyed))) as client:
        body = activity_body(stock=5, per_user_limit=1)
        await client.post("/admin/v1/activities", json=body, headers=admin_headers(keyed))
        answer = await client.post(
            f"/api/v1/activities/{body['id']}/orders",
            json={"quantity": 1, "address": address(7)},
            headers=user_headers(keyed, "u7", "k"),
        )
        order_id = (await answer.json())["order_id"]
        cancelled = await client.post(
            f"/api/v1/orders/{order_id}/cancel", headers=user_headers(keyed, "u7")
        )
        assert cancelled.status == 200
        services = client.server.app[SERVICES]
        await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
        assert await Retirer(services.redis, services.store, grace_s=0).retire_once() == 1
        assert not sync_redis.hexists(keys.orders(body["id"]), order_id)
        shown = await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(keyed, "u7"))
        seen = await shown.json()
        assert seen["status"] == "cancelled"
        assert seen["address"] == dict(address(7), phone="139****0007")
