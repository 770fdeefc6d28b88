"""Reviews and recommendations: an upstream that fails or hangs never breaks the page."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers

Client = TestClient[Any, Any]


class FakeUpstream:
    """A fake upstream HTTP service the test switches between healthy, failing and hanging."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.hits = 0
        self.app = web.Application()
        self.app.router.add_get("/v1/{activity_id}/reviews", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.mode == "error":
            return web.Response(status=500, text="boom")
        if self.mode == "slow":
            await asyncio.sleep(2)
        return web.json_response([{"stars": 5, "about": request.match_info["activity_id"]}])


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    server = TestServer(fake.app)
    await server.start_server()
    yield fake, f"http://127.0.0.1:{server.port}/v1/{{activity_id}}/reviews"
    await server.close()


@pytest.fixture
async def gateway(settings: Settings, upstream: tuple[FakeUpstream, str]) -> AsyncIterator[Client]:
    settings = settings.replace(
        "upstreams", reviews_url=upstream[1], timeout_s=0.2, fail_max=3, reset_timeout_s=0.5
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def _reviews(client: Client, activity_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/activities/{activity_id}/reviews")
    assert response.status == 200
    return dict(await response.json())


@pytest.mark.parametrize("failure", ["error", "slow"])
async def test_a_failing_upstream_opens_its_breaker_serves_the_last_good_and_recovers(
    gateway: Client, settings: Settings, upstream: tuple[FakeUpstream, str], failure: str
) -> None:
    fake, _ = upstream
    body = activity_body()
    await gateway.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    good = await _reviews(gateway, body["id"])
    assert good["degraded"] is False and good["items"][0]["about"] == body["id"]

    fake.mode = failure
    answers = [await _reviews(gateway, body["id"]) for _ in range(6)]
    assert all(a["degraded"] is True and a["items"] == good["items"] for a in answers)
    breaker = gateway.server.app[SERVICES].upstreams["reviews"].breaker
    assert breaker.state == "open"
    # at most the 3 failures that opened it reached the upstream (a "slow" call abandoned at
    # 0.2 s may never have reached it on a busy machine); the other 3 answers did not call it
    assert fake.hits <= 1 + 3, "once open, the upstream is not called any more"

    fake.mode = "ok"
    await asyncio.sleep(0.6)  # reset timeout: the next call is the probe
    recovered = await _reviews(gateway, body["id"])
    assert recovered["degraded"] is False and breaker.state == "closed"
    metrics = await (await gateway.get("/metrics")).text()
    assert 'seckill_breaker_state{breaker="upstream:reviews"} 0.0' in metrics
    assert 'seckill_upstream_fallbacks_total{upstream="reviews"} 6.0' in metrics


async def test_the_switch_and_a_missing_configuration_answer_the_fallback(
    gateway: Client, settings: Settings, upstream: tuple[FakeUpstream, str]
) -> None:
    fake, _ = upstream
    body = activity_body()
    await gateway.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    response = await gateway.put(
        "/admin/v1/flags/reviews.enabled", json={"value": False}, headers=admin_headers(settings)
    )
    assert response.status == 200
    off = await _reviews(gateway, body["id"])
    assert off == {"activity_id": body["id"], "items": [], "degraded": True}
    assert fake.hits == 0, "a switched-off upstream is not called"
    unconfigured = await gateway.get(f"/api/v1/activities/{body['id']}/recommendations")
    assert (await unconfigured.json())["degraded"] is True
    missing = await gateway.get("/api/v1/activities/nope/reviews")
    assert missing.status == 404
