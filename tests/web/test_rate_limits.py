"""Rate limits: accurate per level, after replays, shadow mode, and reloads that cannot break."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, user_headers

Client = TestClient[Any, Any]
_keys = itertools.count()

NO_LIMITS = """
[default]
user_rate_per_s = 0
"""


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "limits.toml"
    path.write_text(NO_LIMITS)
    return path


@pytest.fixture
async def limited(settings: Settings, rules: Path) -> AsyncIterator[Client]:
    settings = settings.replace("limits", rules_path=str(rules))
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def _activity(client: Client, settings: Settings, rules: Path, text: str) -> str:
    body = activity_body(stock=1_000_000, per_user_limit=1000)
    await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    rules.write_text(text.replace("ACTIVITY", body["id"]))
    client.server.app[SERVICES].limits.maybe_reload()
    return str(body["id"])


async def _hammer(
    client: Client, settings: Settings, activity_id: str, seconds: float, users: list[str]
) -> tuple[Counter[int], float]:
    """Requests as fast as 20 concurrent callers go; the status counts and the time taken."""
    statuses: Counter[int] = Counter()
    started = time.monotonic()

    async def caller(n: int) -> None:
        while time.monotonic() - started < seconds:
            user = users[n % len(users)]
            response = await client.post(
                f"/api/v1/activities/{activity_id}/orders",
                json={"quantity": 1},
                headers=user_headers(settings, user, f"k{next(_keys)}"),
            )
            statuses[response.status] += 1
            await response.read()

    await asyncio.gather(*(caller(n) for n in range(20)))
    return statuses, time.monotonic() - started


@pytest.mark.parametrize(
    ("level", "text", "rate", "burst", "users"),
    [
        ("user", "[default]\nuser_rate_per_s = 20\nuser_burst = 10\n", 20, 10, ["solo"]),
        (
            "ip",
            "[default]\nuser_rate_per_s = 0\nip_rate_per_s = 30\nip_burst = 5\n",
            30,
            5,
            [f"u{n}" for n in range(50)],
        ),
        (
            "admission",
            "[default]\nuser_rate_per_s = 0\n[activity.ACTIVITY]\n"
            "admission_rate_per_s = 40\nadmission_burst = 8\n",
            40,
            8,
            [f"u{n}" for n in range(50)],
        ),
    ],
)
async def test_admitted_never_exceed_rate_times_time_plus_burst(
    limited: Client,
    settings: Settings,
    rules: Path,
    level: str,
    text: str,
    rate: float,
    burst: float,
    users: list[str],
) -> None:
    activity_id = await _activity(limited, settings, rules, text)
    statuses, elapsed = await _hammer(limited, settings, activity_id, 1.5, users)
    admitted = statuses[202]
    assert set(statuses) <= {202, 429}, statuses
    assert statuses[429] > 0, f"{level}: the limit was reached"
    assert admitted <= rate * elapsed + burst, f"{level}: {admitted} admitted in {elapsed:.2f}s"
    # not starving: half of what the rate allowed, or of what was asked (a busy machine may
    # not even ask for as much as the rate allows)
    asked = sum(statuses.values())
    assert admitted >= min(rate * elapsed, asked) * 0.5, f"{level}: starving ({admitted})"


async def test_429_says_when_to_come_back_and_replays_come_first(
    limited: Client, settings: Settings, rules: Path
) -> None:
    activity_id = await _activity(
        limited, settings, rules, "[default]\nuser_rate_per_s = 0.5\nuser_burst = 1\n"
    )
    url = f"/api/v1/activities/{activity_id}/orders"
    first = await limited.post(url, json={"quantity": 1}, headers=user_headers(settings, "a", "k1"))
    assert first.status == 202
    refused = await limited.post(
        url, json={"quantity": 1}, headers=user_headers(settings, "a", "k2")
    )
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert int(refused.headers["RateLimit-Reset"]) >= 1
    replay = await limited.post(
        url, json={"quantity": 1}, headers=user_headers(settings, "a", "k1")
    )
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"


async def test_shadow_mode_counts_but_never_refuses(
    limited: Client, settings: Settings, rules: Path, sync_redis: redis.Redis
) -> None:
    activity_id = await _activity(
        limited,
        settings,
        rules,
        "[default]\nuser_rate_per_s = 1\nuser_burst = 1\nshadow = true\n"
        "[activity.ACTIVITY]\nadmission_rate_per_s = 2\nadmission_burst = 1\n",
    )
    # short: "solo" must stay under its per_user_limit of 1000
    statuses, _ = await _hammer(limited, settings, activity_id, 0.2, ["solo"])
    assert set(statuses) == {202}, statuses
    metrics = await (await limited.get("/metrics")).text()
    assert (
        f'seckill_rate_limited_total{{activity="{activity_id}",mode="shadow",scope="admission"}}'
        in metrics
    )
    shadow_user = sync_redis.hget(keys.counters(activity_id), "shadow_limited_user")
    assert shadow_user is not None and int(shadow_user) > 0


async def test_a_bad_reload_is_counted_and_the_old_rules_stay(
    limited: Client, settings: Settings, rules: Path
) -> None:
    activity_id = await _activity(
        limited, settings, rules, "[default]\nuser_rate_per_s = 0.5\nuser_burst = 1\n"
    )
    limits = limited.server.app[SERVICES].limits
    before = limits.for_activity(activity_id)
    for broken in (
        "[default\nuser_rate_per_s = ",
        "[default]\nuser_rate_per_s = -3\n",
        "[default]\nuser_rte_per_s = 3\n",
        "[surprise]\n",
    ):
        await asyncio.sleep(0.01)  # a new modification time
        rules.write_text(broken)
        assert limits.maybe_reload() is False
        assert limits.for_activity(activity_id) == before
    assert limits.reload_errors == 4
    metrics = await (await limited.get("/metrics")).text()
    assert "seckill_limits_reload_errors_total 4.0" in metrics
    url = f"/api/v1/activities/{activity_id}/orders"
    await limited.post(url, json={"quantity": 1}, headers=user_headers(settings, "a", "k1"))
    again = await limited.post(url, json={"quantity": 1}, headers=user_headers(settings, "a", "k2"))
    assert again.status == 429, "the rules in force still apply"


@pytest.mark.alone  # its floor is a rate in wall-clock time: two gateways hammered at once
async def test_the_redis_admission_bucket_is_exact_across_processes(
    settings: Settings, rules: Path
) -> None:
    """Two gateways that each think they are alone (gateway_processes = 1): their local
    buckets together admit twice the rate, and the Redis bucket must still hold the total."""
    settings = settings.replace("limits", rules_path=str(rules), gateway_processes=1)
    async with (
        TestClient(TestServer(create_app(settings))) as first,
        TestClient(TestServer(create_app(settings))) as second,
    ):
        activity_id = await _activity(
            first,
            settings,
            rules,
            "[default]\nuser_rate_per_s = 0\n[activity.ACTIVITY]\n"
            "admission_rate_per_s = 30\nadmission_burst = 5\n",
        )
        second.server.app[SERVICES].limits.maybe_reload()
        users = [f"u{n}" for n in range(50)]
        (a, elapsed), (b, _) = await asyncio.gather(
            _hammer(first, settings, activity_id, 1.5, users),
            _hammer(second, settings, activity_id, 1.5, users),
        )
    admitted = a[202] + b[202]
    assert admitted <= 30 * elapsed + 5, f"{admitted} admitted in {elapsed:.2f}s by both"
    assert admitted >= min(30 * elapsed, sum(a.values()) + sum(b.values())) * 0.5, "starving"
