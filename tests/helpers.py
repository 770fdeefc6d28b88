"""Shared test helpers: tokens, admin headers, activity bodies, Redis inspection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from seckill.auth import UserAuth
from seckill.settings import Settings

_ids = itertools.count(1)


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for ``condition`` (checked every 50 ms); fail after a generous ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def rfc3339(delta_s: float) -> str:
    """Now + delta_s as RFC 3339 UTC."""
    moment = datetime.now(tz=UTC) + timedelta(seconds=delta_s)
    return moment.isoformat().replace("+00:00", "Z")


def activity_body(**overrides: Any) -> dict[str, Any]:
    """A live activity definition with a fresh id."""
    body: dict[str, Any] = {
        "id": f"act{next(_ids)}",
        "sku_id": "sku-1",
        "title": "Phone",
        "price_cents": 199_900,
        "stock": 10,
        "per_user_limit": 1,
        "starts_at": rfc3339(-60),
        "ends_at": rfc3339(3600),
        "payment_timeout_s": 900,
    }
    body.update(overrides)
    return body


def admin_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin.token}"}


def user_headers(settings: Settings, user: str, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {UserAuth(settings.jwt.secret).mint(user, 600)}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def loops_alive(sync_redis: Any) -> None:
    """Heartbeats as a running writer and sweeper would keep them (the report checks them)."""
    from seckill import keys

    for loop in ("writer", "sweeper"):
        sync_redis.set(keys.heartbeat(loop), "test", ex=300)


def masters(sync_redis: redis.Redis | redis.RedisCluster) -> list[redis.Redis]:
    """A client per master: the one Redis, or each master of a cluster (CONFIG, SLOWLOG)."""
    if isinstance(sync_redis, redis.RedisCluster):
        return [sync_redis.get_redis_connection(n) for n in sync_redis.get_primaries()]
    return [sync_redis]


@contextlib.contextmanager
def redis_commands(sync_redis: redis.Redis | redis.RedisCluster) -> Iterator[list[list[bytes]]]:
    """Every command Redis ran inside the block (the slow log at a 0 us threshold), whoever
    sent it, on every master of a cluster: a test then asserts on the commands that name its
    own keys, never on counts of the whole server (background loops of any process share this
    Redis)."""
    seen: list[list[bytes]] = []
    nodes = masters(sync_redis)
    old = [node.config_get("slowlog-*") for node in nodes]
    for node in nodes:
        node.config_set("slowlog-max-len", 1_000_000)
        node.config_set("slowlog-log-slower-than", 0)
        node.slowlog_reset()
    try:
        yield seen
    finally:
        for node, settings in zip(nodes, old, strict=True):
            entries = node.slowlog_get(1_000_000)
            for name, value in settings.items():
                node.config_set(name, value)
            seen.extend([list(entry["command"].split()) for entry in entries])
