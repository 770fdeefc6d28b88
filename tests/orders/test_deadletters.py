"""Dead letters: moved atomically, shown to a person (CLI, admin API), replayed once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from seckill import keys
from seckill.orders import deadletters
from seckill.orders.streams import GROUP, ensure_group
from seckill.settings import Settings
from tests.helpers import admin_headers


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _order(activity_id: str, n: int) -> bytes:
    blob: bytes = msgpack.packb(
        {
            "order_id": f"{activity_id}.{n:020x}",
            "activity_id": activity_id,
            "user_id": f"person-{n}",
            "quantity": 1,
            "status": "reserved",
            "created_at": 1,
            "expires_at": 2,
            "paid_at": 0,
        }
    )
    return blob


async def _parked(redis: Redis, activity_id: str, payloads: list[bytes]) -> list[str]:
    """Entries delivered to a writer, then dead-lettered; their origin ids."""
    stream = keys.stream(activity_id)
    await ensure_group(redis, stream)
    ids = [(await redis.xadd(stream, {"o": p})).decode() for p in payloads]
    await redis.xreadgroup(GROUP, "w", {stream: ">"})
    for entry_id in ids:
        assert await deadletters.move(redis, stream, entry_id, "test reason", 3)
    return ids


async def test_the_move_is_atomic_and_only_for_pending_entries(redis: Redis) -> None:
    """Invariant: a dead letter replaces a pending entry (copied then acknowledged, in one
    step); an entry no longer pending (stored meanwhile by another writer) is left alone."""
    [origin] = await _parked(redis, "dl", [b"\xc1"])
    stream = keys.stream("dl")
    pending: Any = await redis.xpending(stream, GROUP)
    assert pending["pending"] == 0, "acknowledged with the move"
    [dead] = await deadletters.page(redis, "dl")
    assert dead["origin_id"] == origin and dead["origin_stream"] == stream
    assert (dead["reason"], dead["attempts"], dead["summary"]) == ("test reason", 3, None)
    assert await deadletters.move(redis, stream, origin, "again", 1) is None
    assert await deadletters.count(redis, "dl") == 1, "not moved twice"


async def test_replay_puts_each_back_once(redis: Redis) -> None:
    """Invariant: replay moves a dead letter back to its origin as a new entry, exactly once."""
    await _parked(redis, "rp", [_order("rp", 1), _order("rp", 2)])
    stream = keys.stream("rp")
    before = int(await redis.xlen(stream))
    assert await deadletters.replay(redis, "rp") == (2, [])
    assert await deadletters.replay(redis, "rp") == (0, [])
    assert await deadletters.count(redis, "rp") == 0
    assert int(await redis.xlen(stream)) == before + 2
    undelivered: Any = await redis.xreadgroup(GROUP, "w", {stream: ">"})
    assert len(undelivered[0][1]) == 2, "the group delivers them again"


def _seckill(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env["SECKILL_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "seckill", "deadletters", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_command_lists_and_replays(redis: Redis, redis_url: str) -> None:
    """Invariant: `seckill deadletters list` shows every dead letter (JSON lines, a summary of
    what decodes) and `replay` re-queues them, printing how many."""
    origins = await _parked(redis, "cli", [b"\xc1", _order("cli", 7)])
    listed = await asyncio.to_thread(_seckill, redis_url, "list", "cli")
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [line["origin_id"] for line in lines] == origins
    assert lines[0]["summary"] is None
    assert lines[1]["summary"] == {
        "kind": "order",
        "order_id": "cli.00000000000000000007",
        "status": "reserved",
    }
    assert "user_id" not in json.dumps(lines), "no personal data beyond ids"
    replayed = await asyncio.to_thread(_seckill, redis_url, "replay", "cli")
    # the undecodable one goes back too: the stream is where a fixed writer would meet it
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {"activity_id": "cli", "replayed": 2}
    assert await deadletters.count(redis, "cli") == 0


async def test_the_admin_endpoint_pages_them(
    redis: Redis, client: TestClient[Any, Any], settings: Settings
) -> None:
    """Invariant: GET /admin/v1/activities/{id}/dead-letters shows the count and the oldest
    `limit` dead letters, to the admin only."""
    origins = await _parked(redis, "api", [_order("api", n) for n in range(3)])
    url = "/admin/v1/activities/api/dead-letters"
    response = await client.get(url, headers=admin_headers(settings), params={"limit": "2"})
    assert response.status == 200
    body = await response.json()
    assert body["activity_id"] == "api" and body["count"] == 3
    assert [d["origin_id"] for d in body["dead_letters"]] == origins[:2]
    assert (await client.get(url)).status == 401
    for bad in ("0", "1001", "x"):
        answer = await client.get(url, headers=admin_headers(settings), params={"limit": bad})
        assert answer.status == 400, bad
    unknown = await client.get(
        "/admin/v1/activities/nothing-here/dead-letters", headers=admin_headers(settings)
    )
    assert unknown.status == 404
