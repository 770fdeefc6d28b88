"""The sold-out fast path: no Redis for non-holders, winners still replay, every process learns."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, redis_commands, user_headers

pytestmark = pytest.mark.contract

Client = TestClient[Any, Any]


async def _buy(
    client: Client, settings: Settings, activity_id: str, user: str, key: str = "k"
) -> Any:
    return await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, user, key),
    )


async def _until(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_sold_out_is_answered_without_redis_and_winners_still_replay(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    async with (
        TestClient(TestServer(create_app(settings))) as seller,
        TestClient(TestServer(create_app(settings))) as other,
    ):
        body = activity_body(stock=2)
        created = await seller.post(
            "/admin/v1/activities", json=body, headers=admin_headers(settings)
        )
        assert created.status == 201, await created.text()
        activity_id = body["id"]
        # the other process has seen the activity before it sells out: it learns of a new one
        # by pub/sub or its periodic refresh, late on a busy machine (wait on it, generously)
        deadline = asyncio.get_running_loop().time() + 30
        while (await other.get(f"/api/v1/activities/{activity_id}")).status != 200:
            assert asyncio.get_running_loop().time() < deadline, "never saw the new activity"
            await asyncio.sleep(0.05)

        first = await _buy(seller, settings, activity_id, "winner1")
        second = await _buy(seller, settings, activity_id, "winner2")
        assert first.status == second.status == 202

        other_catalog = other.server.app[SERVICES].catalog
        # the process that sold the last unit announced it; the other one learns by pub/sub
        await _until(lambda: other_catalog.entries()[activity_id].holders is not None)

        with redis_commands(sync_redis) as commands:
            for gateway in (seller, other):
                for n in range(20):
                    response = await _buy(gateway, settings, activity_id, f"loser{n}")
                    assert response.status == 409
                    assert (await response.json())["error"]["code"] == "sold_out"
        asked = [c for c in commands if any(b"loser" in arg for arg in c)]
        assert asked == [], "non-holders were answered without Redis"

        # a winner's retry reaches Redis and gets the same 202
        with redis_commands(sync_redis) as commands:
            for gateway in (seller, other):
                again = await _buy(gateway, settings, activity_id, "winner1")
                assert again.status == 202
                assert again.headers["Idempotent-Replayed"] == "true"
                assert (await again.json())["order_id"] == (await first.json())["order_id"]
        scripts = [c for c in commands if c[:1] == [b"EVALSHA"] and b"winner1" in c]
        assert len(scripts) == 2, scripts

        state = await (await other.get(f"/api/v1/activities/{activity_id}")).json()
        assert state["state"] == "sold_out" and state["stock_left"] == 0


async def test_returned_stock_clears_the_mark_without_any_message(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    body = activity_body(stock=1)
    await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    activity_id = body["id"]
    assert (await _buy(client, settings, activity_id, "winner")).status == 202

    catalog = client.server.app[SERVICES].catalog
    await _until(lambda: catalog.entries()[activity_id].holders is not None)
    assert (await _buy(client, settings, activity_id, "late")).status == 409

    # an item comes back behind the gateways' backs (no pub/sub event): the periodic
    # re-read must notice within refresh_interval_s and stop answering sold_out
    sync_redis.incrby(keys.stock(activity_id), 1)
    sync_redis.hincrby(keys.sku_stock(activity_id), body["sku_id"], 1)  # and its SKU's counter
    await _until(lambda: catalog.entries()[activity_id].stock_left == 1)
    response = await _buy(client, settings, activity_id, "late", "k2")
    assert response.status == 202


async def test_a_lost_sold_out_message_is_corrected_by_the_periodic_check(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    body = activity_body(stock=1)
    await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    activity_id = body["id"]
    assert (await client.get(f"/api/v1/activities/{activity_id}")).status == 200
    # stock vanishes without any gateway selling it, so no process announces anything
    sync_redis.set(keys.stock(activity_id), 0)

    catalog = client.server.app[SERVICES].catalog
    await _until(lambda: catalog.entries()[activity_id].holders is not None)
    with redis_commands(sync_redis) as commands:
        assert (await _buy(client, settings, activity_id, "someone")).status == 409
    assert [c for c in commands if any(b"someone" in arg for arg in c)] == []
