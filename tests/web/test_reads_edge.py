"""Reads stay off the database: per-user buckets on order reads and cancels, and ids of
activities that do not exist answered 404 from the local set of known ids, asking neither
Redis nor the store. /readyz's Redis probe is shared for a second."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill.limits import parse_orders
from seckill.orders.sqlite import SqliteStore
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, redis_commands, user_headers

pytestmark = pytest.mark.contract

Client = TestClient[Any, Any]


class CountingStore(SqliteStore):
    """The real SQLite store, counting the queries that reach it."""

    queries = 0

    async def _query(self, *args: Any, **kwargs: Any) -> Any:
        self.queries += 1
        return await super()._query(*args, **kwargs)  # type: ignore[misc]


def _pings(sync_redis: redis.Redis, since: int) -> int:
    """PINGs in the slow log (at a 0 us threshold) after entry ``since``, the Sentinels' own
    (they watch the primary every second) left out."""
    entries = sync_redis.slowlog_get(100_000)
    return sum(
        1
        for entry in entries
        if entry["id"] > since
        and entry["command"].split()[0].lower() == b"ping"
        and not entry.get("client_name", b"").startswith(b"sentinel-")
    )


async def _started(client: Client) -> None:
    """Wait until the catalog has read the set of known activity ids."""
    catalog = client.server.app[SERVICES].catalog
    deadline = time.monotonic() + 20
    while catalog.known("never-created") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not catalog.known("never-created")


@pytest.fixture
async def counted(settings: Settings, tmp_path: Path) -> Any:
    app = create_app(settings)
    store = CountingStore(str(tmp_path / "counted.db"))
    app[SERVICES].store = store
    async with TestClient(TestServer(app)) as client:
        await _started(client)
        yield client, store


async def test_a_token_looping_order_ids_is_limited_and_reaches_no_database(
    counted: tuple[Client, CountingStore], settings: Settings, sync_redis: redis.Redis
) -> None:
    client, store = counted
    body = activity_body()
    created = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert created.status == 201
    store.queries = 0
    statuses: list[int] = []
    for n in range(40):
        response = await client.get(
            f"/api/v1/orders/nope{n}.{secrets.token_hex(10)}",
            headers=user_headers(settings, "looper"),
        )
        statuses.append(response.status)
        if response.status == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert (await response.json())["error"]["code"] == "rate_limited"
    assert set(statuses) == {404, 429} and statuses[0] == 404
    assert statuses.count(404) < 40, "the loop is rate limited"
    assert store.queries == 0, "ids of unknown activities never reach the database"
    # (Redis is not asked either: test_unknown_activity_ids_are_answered_without_redis. A
    # server-wide HGET count here raced other processes sharing the test Redis.)
    # the control: an id of a known activity that Redis no longer holds is the store's to answer
    response = await client.get(
        f"/api/v1/orders/{body['id']}.{secrets.token_hex(10)}",
        headers=user_headers(settings, "another"),
    )
    assert response.status == 404
    assert store.queries == 1


async def test_cancels_are_limited_per_user(
    counted: tuple[Client, CountingStore], settings: Settings
) -> None:
    client, store = counted
    statuses = []
    for n in range(20):
        response = await client.post(
            f"/api/v1/orders/nope.{n:020x}/cancel", headers=user_headers(settings, "canceller")
        )
        statuses.append(response.status)
    assert statuses[0] == 404 and 429 in statuses
    other = await client.post(
        f"/api/v1/orders/nope.{0:020x}/cancel", headers=user_headers(settings, "someone-else")
    )
    assert other.status == 404, "the bucket is per user"
    assert store.queries == 0


async def test_unknown_activity_ids_are_answered_without_redis(
    counted: tuple[Client, CountingStore], settings: Settings, sync_redis: redis.Redis
) -> None:
    client, _ = counted
    with redis_commands(sync_redis) as commands:
        for n in range(30):
            response = await client.get(f"/api/v1/activities/ghost{n}")
            assert response.status == 404
            response = await client.post(
                f"/api/v1/activities/ghost{n}/orders",
                json={"quantity": 1},
                headers=user_headers(settings, f"u{n}", key="k1"),
            )
            assert response.status == 404
    asked = [command for command in commands if any(b"ghost" in arg for arg in command)]
    assert asked == [], asked[:3]
    # a new activity is known at once (its creation is announced), not after a refresh
    body = activity_body()
    created = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert created.status == 201
    assert (await client.get(f"/api/v1/activities/{body['id']}")).status == 200


async def test_readyz_probes_redis_once_for_many_callers(
    counted: tuple[Client, CountingStore], sync_redis: redis.Redis
) -> None:
    client, _ = counted
    old = sync_redis.config_get("slowlog-*")
    sync_redis.config_set("slowlog-max-len", 100_000)
    sync_redis.config_set("slowlog-log-slower-than", 0)
    try:
        last = sync_redis.slowlog_get(1)
        since = last[0]["id"] if last else -1
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(50)))
        assert {answer.status for answer in answers} == {200}
        assert _pings(sync_redis, since) <= 2
    finally:
        for name, value in old.items():
            sync_redis.config_set(name, value)


def test_order_buckets_in_limits_toml_are_validated() -> None:
    rule = parse_orders("[orders]\nread_rate_per_s = 1\nread_burst = 3\n")
    assert rule.read_rate_per_s == 1 and rule.read_burst == 3 and rule.cancel_burst == 5
    for bad in ("read_rate_per_s = -1", 'read_burst = "x"', "reads = 1", "read_burst = true"):
        with pytest.raises(ValueError):
            parse_orders(f"[orders]\n{bad}\n")
