"""Redis memory: bounded and never evicting; an evicting Redis is refused at start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from seckill import eviction
from seckill import settings as settings_module
from seckill.embedded import EmbeddedRedis, free_port


@pytest.fixture
def evicting_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of its own whose policy an operator left at allkeys-lru."""
    server = EmbeddedRedis(tmp_path / "lru", appendfsync="no")
    server.start()
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.close()
    yield server.url
    server.stop()


def _env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(
        SECKILL_REDIS_URL=redis_url,
        SECKILL_DATABASE_URL=f"sqlite:///{tmp_path / 'orders.db'}",
        SECKILL_SERVER_VAR_DIR=str(tmp_path / "var"),
        SECKILL_DEV="1",  # this test is about Redis, not about development secrets
    )
    return env


@pytest.mark.parametrize("command", [["serve"], ["writer"], ["up"]])
def test_an_evicting_redis_is_refused_at_start(
    evicting_redis: str, tmp_path: Path, command: list[str]
) -> None:
    """Invariant: seckill never runs where Redis may silently drop its keys."""
    port = ["--port", str(free_port())] if command != ["writer"] else []
    result = subprocess.run(
        [sys.executable, "-m", "seckill", *command, *port],
        env=_env(evicting_redis, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "maxmemory-policy" in line]
    assert len(lines) == 1, result.stderr
    assert "'allkeys-lru'" in lines[0] and "noeviction" in lines[0]
    assert "serving on" not in result.stdout


def test_the_embedded_redis_runs_bounded_and_never_evicting(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendfsync="no", maxmemory="64mb")
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        memory = client.info("memory")
        client.close()
    finally:
        server.stop()
    assert memory["maxmemory_policy"] == "noeviction"
    assert memory["maxmemory"] == 64 * 1024 * 1024


async def test_a_noeviction_or_unreachable_redis_is_not_refused(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    base = settings_module.load(environ=env)
    assert await eviction.policy_refusal(base.replace("redis", url=redis_url)) is None
    unreachable = base.replace("redis", url=f"redis://127.0.0.1:{free_port()}/0")
    assert await eviction.policy_refusal(unreachable) is None


def test_maxmemory_is_a_setting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    assert settings_module.load(environ=env).redis.maxmemory == "1gb"
    loaded = settings_module.load(environ=env | {"SECKILL_REDIS_MAXMEMORY": "256mb"})
    assert loaded.redis.maxmemory == "256mb"
    with pytest.raises(settings_module.SettingsError, match=r"redis\.maxmemory"):
        settings_module.load(environ=env | {"SECKILL_REDIS_MAXMEMORY": "lots"})


async def test_a_full_redis_refuses_new_orders_with_503_and_loses_nothing(
    client: Any, settings: Any, sync_redis: redis.Redis
) -> None:
    """Invariant: at maxmemory (noeviction) a purchase fails closed; nothing is half-written,
    an accepted order's retry still replays, and sales resume once memory is back."""
    from seckill import keys
    from tests.helpers import activity_body, admin_headers, user_headers

    body = activity_body(stock=5)
    activity_id = body["id"]
    await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    url = f"/api/v1/activities/{activity_id}/orders"
    first = await client.post(url, json={"quantity": 1}, headers=user_headers(settings, "a", "k"))
    assert first.status == 202
    order_id = (await first.json())["order_id"]
    before = sync_redis.hgetall(keys.counters(activity_id))
    previous = sync_redis.config_get("maxmemory")["maxmemory"]
    sync_redis.config_set("maxmemory", 1)  # used memory is now over the limit
    try:
        full = await client.post(
            url, json={"quantity": 1}, headers=user_headers(settings, "b", "k")
        )
        assert full.status == 503 and (await full.json())["error"]["code"] == "overloaded"
        assert full.headers["Retry-After"]
        replay = await client.post(
            url, json={"quantity": 1}, headers=user_headers(settings, "a", "k")
        )
        assert replay.status == 202 and (await replay.json())["order_id"] == order_id
        cancel = await client.post(
            f"/api/v1/orders/{order_id}/cancel", headers=user_headers(settings, "a")
        )
        assert cancel.status == 503
    finally:
        sync_redis.config_set("maxmemory", previous)
    assert sync_redis.hgetall(keys.counters(activity_id)) == before, "nothing half-written"
    again = await client.post(url, json={"quantity": 1}, headers=user_headers(settings, "b", "k"))
    assert again.status == 202
