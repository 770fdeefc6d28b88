"""The backlog ceiling: past it, purchases fail closed (503) until the writers catch up."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys
from seckill.orders.writer import Writer, WriterConfig
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, user_headers

Client = TestClient[Any, Any]
CEILING = 3


@pytest.fixture
async def ceiling(settings: Settings) -> AsyncIterator[Client]:
    app = create_app(settings.replace("writer", backlog_ceiling=CEILING))
    async with TestClient(TestServer(app)) as client:
        yield client


async def _buy(client: Client, settings: Settings, activity_id: str, user: str) -> Any:
    return await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, user, "k"),
    )


def _over(text: str, activity_id: str) -> float:
    match = re.search(
        rf'^seckill_backlog_over_ceiling{{activity="{activity_id}"}} (\S+)$', text, re.M
    )
    assert match, "seckill_backlog_over_ceiling not exported"
    return float(match.group(1))


async def test_purchases_answer_overloaded_past_the_ceiling_and_resume_after_the_drain(
    ceiling: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    """Invariant: past the ceiling nothing new is accepted (nothing reserved, nothing lost)."""
    client = ceiling
    body = activity_body(stock=100)
    activity_id = str(body["id"])
    await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))

    accepted: list[str] = []
    deadline = time.monotonic() + 20
    while True:  # buy until the background refresh sees the backlog past the ceiling
        response = await _buy(client, settings, activity_id, f"u{len(accepted)}")
        if response.status == 503:
            break
        assert response.status == 202
        accepted.append(f"u{len(accepted)}")
        assert time.monotonic() < deadline, "the ceiling never took effect"
        await asyncio.sleep(0.05)
    assert len(accepted) > CEILING
    error = (await response.json())["error"]
    assert error["code"] == "overloaded" and response.headers["Retry-After"]
    created = int(sync_redis.hget(keys.counters(activity_id), "orders_created") or 0)
    assert created == len(accepted), "the refused purchase reserved nothing"
    metrics = await (await client.get("/metrics")).text()
    assert _over(metrics, activity_id) == 1.0
    # a shopper whose order was accepted still gets the same 202 on a retry
    replay = await _buy(client, settings, activity_id, accepted[0])
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"

    services = client.server.app[SERVICES]
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    deadline = time.monotonic() + 20
    while (response := await _buy(client, settings, activity_id, "late")).status == 503:
        assert time.monotonic() < deadline, "sales did not resume after the drain"
        await asyncio.sleep(0.05)
    assert response.status == 202
    assert _over(await (await client.get("/metrics")).text(), activity_id) == 0.0
