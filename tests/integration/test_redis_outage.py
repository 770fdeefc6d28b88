"""Redis dies in the middle of a sale: no hang, fail closed, no oversell, and recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys
from seckill.embedded import EmbeddedRedis
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, until, user_headers

TIMEOUT_S = 0.3


async def test_redis_killed_mid_burst_fails_closed_and_recovers(
    settings: Settings, tmp_path: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendfsync="always")
    server.start()
    settings = settings.replace(
        "redis", url=server.url, socket_timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S
    ).replace("protection", redis_fail_max=5, redis_reset_timeout_s=0.5)
    stock = 50_000  # still on sale when Redis dies: the sold-out path needs no Redis
    try:
        async with TestClient(TestServer(create_app(settings))) as client:
            body = activity_body(stock=stock)
            await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
            activity_id = body["id"]
            outcomes: Counter[tuple[int, str]] = Counter()
            retry_after_missing = 0
            users = iter(range(10**6))

            async def buyer(stop: asyncio.Event) -> None:
                nonlocal retry_after_missing
                while not stop.is_set():
                    user = f"u{next(users)}"
                    response = await asyncio.wait_for(
                        client.post(
                            f"/api/v1/activities/{activity_id}/orders",
                            json={"quantity": 1},
                            headers=user_headers(settings, user, "k"),
                        ),
                        timeout=5,  # a hang fails the test here
                    )
                    answer = await response.json()
                    code = answer.get("error", {}).get("code", "accepted")
                    outcomes[response.status, code] += 1
                    if response.status == 503 and "Retry-After" not in response.headers:
                        retry_after_missing += 1
                    await asyncio.sleep(0.005)

            stop = asyncio.Event()
            buyers = [asyncio.create_task(buyer(stop)) for _ in range(20)]
            await until(lambda: outcomes[202, "accepted"] > 0, 30, "sales before the crash")
            process = server._process
            assert process is not None
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

            # failing closed: buyers answered 503 while the breaker opens (no hang: the
            # 5 s bound above)
            breaker = client.server.app[SERVICES].redis_breaker
            await until(
                lambda: breaker.state in ("open", "half-open") and outcomes[503, "overloaded"] > 0,
                30,
                "the breaker to open and buyers to be answered 503",
            )
            during = Counter(outcomes)
            ready = await client.get("/readyz")
            assert ready.status == 503 and "Retry-After" in ready.headers
            assert (await client.get("/healthz")).status == 200

            accepted_before_restart = outcomes[202, "accepted"]
            server.start()  # same port, same data directory: the AOF brings every order back
            await until(
                lambda: outcomes[202, "accepted"] > accepted_before_restart, 30, "sales to resume"
            )
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*buyers)
            assert breaker.state == "closed"
            assert (await client.get("/readyz")).status == 200

        assert during[503, "overloaded"] > 0, "the outage answered 503 overloaded"
        assert retry_after_missing == 0, "every 503 carried Retry-After"
        assert set(outcomes) <= {(202, "accepted"), (503, "overloaded"), (409, "sold_out")}
        check = redis.Redis.from_url(server.url)
        left = int(check.get(keys.stock(activity_id)))
        sold = check.xlen(keys.stream(activity_id))
        held = sum(int(v) for v in check.hgetall(keys.holders(activity_id)).values())
        check.close()
        assert left >= 0 and left + held == stock, "initial = available + reserved"
        assert sold == held, "every reservation is one queued order"
        assert outcomes[202, "accepted"] <= stock, "never oversold"
        assert outcomes[202, "accepted"] <= sold, "every 202 seen is in Redis after the crash"
    finally:
        server.stop()


async def test_beyond_max_in_flight_requests_are_shed_at_once(settings: Settings) -> None:
    from aiohttp import web

    gate = asyncio.Event()

    async def slow_reviews(request: web.Request) -> web.Response:
        await gate.wait()  # holds the gateway's request in flight until the test lets go
        return web.json_response([])

    upstream = web.Application()
    upstream.router.add_get("/reviews/{activity_id}", slow_reviews)
    async with TestServer(upstream) as fake:
        settings = settings.replace("protection", max_in_flight=2).replace(
            "upstreams", reviews_url=f"{fake.make_url('/reviews')}/{{activity_id}}", timeout_s=30
        )
        async with TestClient(TestServer(create_app(settings))) as client:
            services = client.server.app[SERVICES]
            body = activity_body(stock=10)
            await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
            url = f"/api/v1/activities/{body['id']}/orders"
            held = [
                asyncio.create_task(client.get(f"/api/v1/activities/{body['id']}/reviews"))
                for _ in range(2)
            ]
            deadline = time.monotonic() + 20
            while services.in_flight < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert services.in_flight == 2
            shed = await client.post(
                url, json={"quantity": 1}, headers=user_headers(settings, "x", "k")
            )
            assert shed.status == 503
            assert (await shed.json())["error"]["code"] == "overloaded"
            assert shed.headers["Retry-After"] == "1"
            assert (await client.get("/healthz")).status == 200, "ops endpoints are never shed"
            metrics = await (await client.get("/metrics")).text()
            assert "seckill_shed_total 1.0" in metrics
            gate.set()
            assert [r.status for r in await asyncio.gather(*held)] == [200, 200]

            # a request still sending its body holds no slot: slow uploads cannot shed buyers
            trickled = asyncio.Event()

            async def trickle() -> Any:
                yield b'{"quantity"'
                await trickled.wait()
                yield b": 1}"

            slow = [
                asyncio.create_task(
                    client.post(url, data=trickle(), headers=user_headers(settings, f"h{n}", "k"))
                )
                for n in range(3)
            ]
            while services.receiving < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert services.receiving == 3 and services.in_flight == 0
            after = await client.post(
                url, json={"quantity": 1}, headers=user_headers(settings, "y", "k")
            )
            assert after.status == 202, "not shed while three bodies are still on their way"
            trickled.set()
            assert [r.status for r in await asyncio.gather(*slow)] == [202, 202, 202]
