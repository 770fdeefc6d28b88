"""The ops console's server side: the page, the live stream, the activity reads it edits from.

The browser drives all of it in tests/integration/test_console_browser.py; these check the
HTTP surface directly, fast, with the real app and a real Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from seckill.settings import Settings
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, loops_alive, user_headers

Client = TestClient[Any, Any]


async def _events(response: ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The snapshots of an SSE answer, one at a time, as they arrive."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            message, buffer = buffer.split(b"\n\n", 1)
            data = [line[5:].strip() for line in message.split(b"\n") if line.startswith(b"data:")]
            if data:
                yield json.loads(b"\n".join(data))


async def _until(predicate: Any, within_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_the_page_is_public_static_and_locked_down(client: Client) -> None:
    """Invariant: the page holds no data nor secret, loads only its own files, cannot be framed."""
    page = await client.get("/admin/console")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/admin/console/console.js"' in html
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "http" not in policy  # no CDN, nothing from elsewhere
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        asset = await client.get(f"/admin/console/{name}")
        assert asset.status == 200 and asset.content_type == kind
    script = await (await client.get("/admin/console/console.js")).text()
    for storage in ("localStorage", "sessionStorage", "document.cookie", "indexedDB"):
        assert storage not in script, f"the token must stay in memory, not in {storage}"
    missing = await client.get("/admin/console/other.js")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"


async def test_the_stream_is_admin_only(client: Client, settings: Settings) -> None:
    """Invariant: without the admin token nothing streams; bad parameters are refused."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, user_headers(settings, "u1")):
        refused = await client.get("/admin/v1/live", headers=headers)
        assert refused.status == 401
        assert (await refused.json())["error"]["code"] == "unauthorized"
    assert client.app is not None
    assert not client.app[SERVICES].live.running  # type: ignore[union-attr]
    for query in ("events=x", "events=-1", "events=86401", "token=abc"):
        bad = await client.get(f"/admin/v1/live?{query}", headers=admin_headers(settings))
        assert bad.status == 400, query
        assert (await bad.json())["error"]["code"] == "invalid_request"


async def test_a_snapshot_shows_the_sale_and_its_traffic(
    client: Client, settings: Settings, sync_redis: Any
) -> None:
    """The stream's snapshots carry each activity's report and the orders per second."""
    loops_alive(sync_redis)
    body = activity_body(stock=20, per_user_limit=2)
    created = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert created.status == 201
    response = await client.get("/admin/v1/live?events=20", headers=admin_headers(settings))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = _events(response)
    first = await anext(events)
    assert first["redis"] == {"up": True, "error": None}
    assert first["sale"] == {"enabled": True}
    names = {b["name"] for b in first["breakers"]}
    assert names >= {"redis", "upstream:reviews", "upstream:recommendations"}
    [activity] = [a for a in first["activities"] if a["id"] == body["id"]]
    assert activity["state"] == "live"
    assert activity["report"]["available"] == 20
    for n in range(3):
        placed = await client.post(
            f"/api/v1/activities/{body['id']}/orders",
            json={"quantity": 1},
            headers=user_headers(settings, f"buyer{n}", f"k{n}"),
        )
        assert placed.status == 202
    seen_rate = False
    async for snapshot in events:
        [activity] = [a for a in snapshot["activities"] if a["id"] == body["id"]]
        seen_rate = (
            seen_rate
            or snapshot["requests"]["by_endpoint"].get("order_create", {}).get("ok", 0) > 0
        )
        if activity["report"]["reserved"] == 3 and seen_rate:
            break
    else:
        raise AssertionError("the stream ended before the orders showed")
    assert activity["report"]["available"] == 17
    assert activity["report"]["orders_created"] == 3
    # shallow: counts only, never every order record, whatever the size of the sale
    assert activity["report"]["orders_checked"] is False
    assert activity["report"]["consistent"] is True, activity["report"]["problems"]
    response.close()


async def test_one_snapshot_a_second_for_every_viewer_and_none_unwatched(
    client: Client, settings: Settings
) -> None:
    """Invariant: the snapshot work is shared by all consoles and stops with the last one;
    the purchase and sold-out paths never start it."""
    assert client.app is not None
    live = client.app[SERVICES].live
    assert live is not None
    body = activity_body(stock=1)
    created = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert created.status == 201
    for n, status in enumerate((202, 409, 409)):  # a sale, then the sold-out path
        placed = await client.post(
            f"/api/v1/activities/{body['id']}/orders",
            json={"quantity": 1},
            headers=user_headers(settings, f"b{n}", f"k{n}"),
        )
        assert placed.status == status
    assert live.snapshots == 0 and not live.running  # nobody watched: nothing was computed

    async def watch() -> int:
        response = await client.get("/admin/v1/live?events=3", headers=admin_headers(settings))
        return sum([1 async for _ in _events(response)])

    counts = await asyncio.gather(*(watch() for _ in range(4)))
    assert counts == [3, 3, 3, 3]
    # four viewers of three snapshots each: about three snapshots taken, never twelve
    assert live.snapshots <= 6, live.snapshots
    await _until(lambda: not live.running)
    taken = live.snapshots
    await asyncio.sleep(1.5)  # the one wait that must pass: nothing may happen meanwhile
    assert live.snapshots == taken


async def test_the_flags_in_a_snapshot_carry_their_expiry(
    client: Client, settings: Settings
) -> None:
    """A flag set with a TTL shows when it returns, and the sale shows as degraded."""
    put = await client.put(
        "/admin/v1/flags/seckill.enabled",
        json={"value": False, "ttl_s": 600},
        headers=admin_headers(settings),
    )
    assert put.status == 200
    expires = (await put.json())["expires_at"]
    response = await client.get("/admin/v1/live?events=1", headers=admin_headers(settings))
    [snapshot] = [s async for s in _events(response)]
    assert snapshot["sale"] == {"enabled": False}
    assert snapshot["flags"]["seckill.enabled"] is False
    assert snapshot["flag_expiries"]["seckill.enabled"] == expires
    assert snapshot["audit"][0]["name"] == "seckill.enabled"
    assert snapshot["audit"][0]["new"] is False


async def test_activities_read_back_for_editing(client: Client, settings: Settings) -> None:
    """GET of one activity and of the list give the definition the console fills its form with."""
    body = activity_body(stock=7, per_user_limit=3, payment_timeout_s=120)
    created = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert created.status == 201
    one = await client.get(f"/admin/v1/activities/{body['id']}", headers=admin_headers(settings))
    assert one.status == 200
    got = await one.json()
    assert got == await created.json()
    for name in ("sku_id", "title", "price_cents", "stock", "per_user_limit", "payment_timeout_s"):
        assert got[name] == body[name]
    listed = await client.get("/admin/v1/activities", headers=admin_headers(settings))
    assert listed.status == 200
    assert body["id"] in [a["id"] for a in (await listed.json())["activities"]]
    for path in (f"/admin/v1/activities/{body['id']}", "/admin/v1/activities"):
        assert (await client.get(path)).status == 401
    missing = await client.get("/admin/v1/activities/nope", headers=admin_headers(settings))
    assert missing.status == 404
    bad = await client.get("/admin/v1/activities?limit=0", headers=admin_headers(settings))
    assert bad.status == 400


async def test_requests_per_second_count_every_worker(settings: Settings, tmp_path: Any) -> None:
    """Under `serve --workers N` the rates sum every worker's counters, not one process's."""
    import os

    from aiohttp.test_utils import TestServer

    from seckill.web.app import create_app

    shared = tmp_path / "metrics"
    shared.mkdir()
    other = shared / f"{os.getppid()}.prom"  # a live process standing for another worker

    def publish(count: int) -> None:
        other.write_text(
            "# TYPE seckill_requests_total counter\n"
            f'seckill_requests_total{{endpoint="order_create",outcome="sold_out"}} {count}\n'
        )

    publish(1000)
    app = create_app(settings.replace("server", metrics_dir=str(shared)))
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/admin/v1/live?events=30", headers=admin_headers(settings))
        events = _events(response)
        await anext(events)
        publish(1500)  # the other worker answered 500 more sold_out meanwhile
        async for snapshot in events:
            rate = snapshot["requests"]["by_endpoint"].get("order_create", {}).get("sold_out")
            if rate:
                break
        else:
            raise AssertionError("the other worker's requests never showed")
        assert rate > 0
        assert snapshot["requests"]["by_outcome"]["sold_out"] == rate
        response.close()


async def test_a_failed_snapshot_is_said_and_the_stream_goes_on(
    client: Client, settings: Settings
) -> None:
    """One bad reading never stops a console: it gets an error frame, then the next snapshot."""
    assert client.app is not None
    live = client.app[SERVICES].live
    assert live is not None
    real = live.take
    calls = 0

    async def fails_once() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a reading gone wrong")
        return await real()

    live.take = fails_once  # type: ignore[method-assign]
    response = await client.get("/admin/v1/live?events=2", headers=admin_headers(settings))
    first, second = [snapshot async for snapshot in _events(response)]
    assert first["error"] == "snapshot failed"
    assert "a reading gone wrong" not in json.dumps(first)  # details stay in the log
    assert second["redis"]["up"] is True and "activities" in second
