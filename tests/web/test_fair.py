"""A fair sale: registration, a committed lottery, turns, and the queue endpoint.

Invariants: only registrants buy; in a lottery only admitted users buy, once per turn, in the
drawn order; stock that comes back goes to the next turn; the draw verifies against its
commitment and a changed seed does not.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import clock, keys, lottery
from seckill.orders.sweeper import Sweeper
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, loops_alive, rfc3339, user_headers

pytestmark = pytest.mark.contract

Client = TestClient[Any, Any]
# registration closes at starts_at: long enough to register on a busy machine
START_S = 4.0


async def _create(client: Client, settings: Settings, **overrides: Any) -> dict[str, Any]:
    body = activity_body(
        **{
            "registration_opens_at": rfc3339(-60),
            "starts_at": rfc3339(START_S),
            "stock": 2,
            **overrides,
        }
    )
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def _register(
    client: Client, settings: Settings, activity_id: str, user: str, **headers: str
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        f"/api/v1/activities/{activity_id}/registration",
        headers={**user_headers(settings, user), **headers},
    )
    return response.status, await response.json()


async def _buy(
    client: Client, settings: Settings, activity_id: str, user: str, key: str
) -> tuple[int, dict[str, Any], Any]:
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, user, key),
    )
    return response.status, await response.json(), response.headers


async def _queue(client: Client, settings: Settings, activity_id: str, user: str) -> Any:
    response = await client.get(
        f"/api/v1/activities/{activity_id}/queue", headers=user_headers(settings, user)
    )
    assert response.status == 200, await response.text()
    return await response.json()


async def _until_started(activity: dict[str, Any]) -> None:
    starts_ms = clock.parse_rfc3339(activity["starts_at"])
    while clock.now_ms() < starts_ms + 20:  # the embedded Redis shares this machine's clock
        await asyncio.sleep(0.05)


async def _drawn(client: Client, settings: Settings, activity_id: str) -> dict[str, int]:
    """Trigger the draw lazily (a queue read after the start), wait for it, return positions."""
    deadline = time.monotonic() + 30
    body = await _queue(client, settings, activity_id, "observer")
    while body["turn"] == "undrawn":
        assert time.monotonic() < deadline, "the draw was never installed"
        await asyncio.sleep(0.6)  # within the queue's per-user poll limit
        body = await _queue(client, settings, activity_id, "observer")
    placed = await client.server.app[SERVICES].lottery.placed(activity_id)
    return placed


def _by_position(placed: dict[str, int]) -> list[str]:
    return [user for user, _ in sorted(placed.items(), key=lambda item: item[1])]


async def test_registration_window_is_idempotent_and_kept_with_device_ids(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    later = await _create(
        client, settings, registration_opens_at=rfc3339(600), starts_at=rfc3339(900)
    )
    status, body = await _register(client, settings, later["id"], "early")
    assert (status, body["error"]["code"]) == (409, "registration_closed"), "before it opens"

    plain = await client.post(
        "/admin/v1/activities", json=activity_body(), headers=admin_headers(settings)
    )
    plain_id = (await plain.json())["id"]
    status, body = await _register(client, settings, plain_id, "u")
    assert (status, body["error"]["code"]) == (409, "registration_closed"), "no registration"

    activity = await _create(client, settings)
    device = {"X-Device-Id": "dev-1"}
    first = await _register(client, settings, activity["id"], "alice", **device)
    assert first[0] == 201 and first[1]["registered"] is True
    again = await _register(client, settings, activity["id"], "alice", **device)
    assert again[0] == 200, "the same user again: 200, nothing recorded twice"
    assert (await _register(client, settings, activity["id"], "bob", **device))[0] == 201
    assert (await _register(client, settings, activity["id"], "carol"))[0] == 201
    assert sync_redis.lrange(keys.registration_order(activity["id"]), 0, -1) == [
        b"alice",
        b"bob",
        b"carol",
    ]
    # kept as the risk rules keep a device: its keyed hash, accounts counted per device
    hashed = client.server.app[SERVICES].risk.subject("alice", "dev-1", None).device
    assert hashed and hashed != "dev-1"
    assert sync_redis.hget(keys.registered_devices(activity["id"]), hashed) == b"2"

    await _until_started(activity)
    status, body = await _register(client, settings, activity["id"], "late")
    assert (status, body["error"]["code"]) == (409, "registration_closed"), "after starts_at"
    assert (await _register(client, settings, activity["id"], "alice"))[0] == 200
    assert sync_redis.llen(keys.registration_order(activity["id"])) == 3

    export = await client.get(
        f"/admin/v1/activities/{activity['id']}/registrants?start=1&limit=5",
        headers=admin_headers(settings),
    )
    assert await export.json() == {
        "activity_id": activity["id"],
        "count": 3,
        "start": 1,
        "registrants": ["bob", "carol"],
    }


async def test_only_registrants_buy_and_fcfs_stays_first_come(
    client: Client, settings: Settings
) -> None:
    activity = await _create(client, settings, stock=5, per_user_limit=1)
    assert activity["admission"] == "fcfs"
    await _register(client, settings, activity["id"], "member")
    status, body, _ = await _buy(client, settings, activity["id"], "stranger", "k1")
    assert (status, body["error"]["code"]) == (403, "not_registered"), "registration first"
    status, body, _ = await _buy(client, settings, activity["id"], "member", "k1")
    assert (status, body["error"]["code"]) == (409, "not_started")

    await _until_started(activity)
    assert (await _buy(client, settings, activity["id"], "member", "k2"))[0] == 202
    status, body, _ = await _buy(client, settings, activity["id"], "stranger", "k2")
    assert (status, body["error"]["code"]) == (403, "not_registered")
    queue = await _queue(client, settings, activity["id"], "member")
    assert queue["registered"] is True and queue["admitted"] is True and queue["turn"] == "fcfs"


async def test_lottery_turns_out_of_turn_once_per_turn_and_returned_stock_goes_next(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity = await _create(
        client, settings, admission="lottery", claim_window_s=600, stock=2, payment_timeout_s=600
    )
    activity_id = activity["id"]
    users = [f"u{i}" for i in range(8)]
    await asyncio.gather(*(_register(client, settings, activity_id, u) for u in users))
    await _until_started(activity)

    status, body, headers = await _buy(client, settings, activity_id, users[0], "early")
    assert (status, body["error"]["code"]) == (409, "not_your_turn"), "before the draw is in"
    assert int(headers["Retry-After"]) >= 1

    order = _by_position(await _drawn(client, settings, activity_id))
    assert sorted(order) == sorted(users)
    first, second, third, fourth = order[:4]

    status, body, headers = await _buy(client, settings, activity_id, third, "k")
    assert (status, body["error"]["code"]) == (409, "not_your_turn"), "out of turn"
    assert int(headers["Retry-After"]) >= 1
    waiting = await _queue(client, settings, activity_id, third)
    assert waiting == {
        "registered": True,
        "position": 3,
        "admitted": False,
        "ahead": 0,
        "eta_s": waiting["eta_s"],
        "turn": "waiting",
        "claim_expires_at": None,
    }
    admitted = await _queue(client, settings, activity_id, first)
    assert admitted["admitted"] is True and admitted["ahead"] == 0 and admitted["eta_s"] == 0

    bought = await _buy(client, settings, activity_id, first, "k1")
    assert bought[0] == 202
    status, body, _ = await _buy(client, settings, activity_id, first, "k1-again")
    assert (status, body["error"]["code"]) == (409, "not_your_turn"), "one purchase per turn"
    assert (await _buy(client, settings, activity_id, first, "k1"))[0] == 202, "a replay replays"
    assert (await _buy(client, settings, activity_id, second, "k2"))[0] == 202

    # a cancel puts the unit back: the next position is admitted, not whoever calls first
    cancel = await client.post(
        f"/api/v1/orders/{bought[1]['order_id']}/cancel", headers=user_headers(settings, first)
    )
    assert cancel.status == 200
    await _on_sale(client, activity_id)
    status, body, _ = await _buy(client, settings, activity_id, fourth, "k4")
    assert (status, body["error"]["code"]) == (409, "not_your_turn")
    status, body, _ = await _buy(client, settings, activity_id, first, "k1-after")
    assert (status, body["error"]["code"]) == (409, "not_your_turn"), "a used turn is gone"
    assert (await _queue(client, settings, activity_id, third))["admitted"] is True
    third_order = await _buy(client, settings, activity_id, third, "k3")
    assert third_order[0] == 202

    # an expiry does the same
    await _expire(sync_redis, client, third_order[1]["order_id"])
    await _on_sale(client, activity_id)
    assert (await _queue(client, settings, activity_id, fourth))["turn"] == "admitted"
    assert (await _buy(client, settings, activity_id, order[4], "k5"))[0] == 409
    assert (await _buy(client, settings, activity_id, fourth, "k4b"))[0] == 202

    loops_alive(sync_redis)
    report = await client.get(
        f"/admin/v1/activities/{activity_id}/report", headers=admin_headers(settings)
    )
    assert (await report.json())["consistent"]


async def _on_sale(client: Client, activity_id: str) -> None:
    """Wait until this process has seen the stock come back (its sold-out mark is gone)."""
    catalog = client.server.app[SERVICES].catalog
    deadline = time.monotonic() + 15
    while catalog.entries()[activity_id].stock_left <= 0:
        assert time.monotonic() < deadline, "the restock never reached the catalog"
        await asyncio.sleep(0.02)


async def _expire(sync_redis: redis.Redis, client: Client, order_id: str) -> None:
    """Move an order's deadline into the past (as time would) and run one sweep."""
    activity_id = keys.activity_of_order(order_id)
    assert activity_id is not None
    record = msgpack.unpackb(sync_redis.hget(keys.orders(activity_id), order_id), raw=False)
    record["expires_at"] = int(time.time() * 1000) - 1
    sync_redis.hset(keys.orders(activity_id), order_id, msgpack.packb(record))
    sync_redis.zadd(keys.deadlines(activity_id), {order_id: record["expires_at"]})
    assert await Sweeper(client.server.app[SERVICES].stock).sweep() == 1


async def test_a_lapsed_claim_window_passes_the_turn_on(client: Client, settings: Settings) -> None:
    activity = await _create(client, settings, admission="lottery", claim_window_s=2, stock=1)
    activity_id = activity["id"]
    for user in ("a", "b", "c"):
        await _register(client, settings, activity_id, user)
    await _until_started(activity)
    first, second, third = _by_position(await _drawn(client, settings, activity_id))

    # nobody buys: once the first claim window closes, the second position is admitted
    deadline = time.monotonic() + 30
    while (await _queue(client, settings, activity_id, second))["turn"] != "admitted":
        assert time.monotonic() < deadline, "the turn never passed on"
        await asyncio.sleep(0.6)
    status, body, _ = await _buy(client, settings, activity_id, first, "late")
    assert (status, body["error"]["code"]) == (409, "not_your_turn"), "a lapsed turn is gone"
    status, _, _ = await _buy(client, settings, activity_id, second, "k")
    assert status == 202
    assert (await _queue(client, settings, activity_id, first))["turn"] == "passed"
    assert (await _queue(client, settings, activity_id, third))["admitted"] is False


async def test_a_parallel_burst_cannot_buy_out_of_turn(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    stock, registrants = 5, 40
    activity = await _create(client, settings, admission="lottery", claim_window_s=600, stock=stock)
    activity_id = activity["id"]
    users = [f"p{i}" for i in range(registrants)]
    await asyncio.gather(*(_register(client, settings, activity_id, u) for u in users))
    await _until_started(activity)
    order = _by_position(await _drawn(client, settings, activity_id))

    # every registrant (and a stranger) fires three orders at once, each with a fresh key
    plan = [(u, f"k{n}") for u in [*users, "stranger"] for n in range(3)]
    results = await asyncio.gather(*(_buy(client, settings, activity_id, u, k) for u, k in plan))
    outcomes = zip(plan, results, strict=True)
    winners = Counter(user for (user, _), (status, _, _) in outcomes if status == 202)
    assert dict(winners) == {u: 1 for u in order[:stock]}, "exactly the first turns, once each"
    codes = Counter(body["error"]["code"] for status, body, _ in results if status != 202)
    # once the last unit is gone the sold-out fast path may answer anyone holding nothing
    assert set(codes) <= {"not_your_turn", "not_registered", "sold_out"}, codes
    assert codes["not_your_turn"] > 0
    assert int(sync_redis.get(keys.stock(activity_id))) == 0


async def test_the_draw_is_committed_verified_and_a_changed_seed_fails(
    client: Client, settings: Settings, sync_redis: redis.Redis, redis_url: str
) -> None:
    body = activity_body(
        registration_opens_at=rfc3339(-60), starts_at=rfc3339(START_S), admission="lottery"
    )
    created = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    activity = await created.json()
    activity_id = activity["id"]
    assert activity["claim_window_s"] == 60, "the default claim window"
    url = f"/admin/v1/activities/{activity_id}/draw"
    before = await (await client.get(url, headers=admin_headers(settings))).json()
    assert before["drawn"] is False and before["seed"] is None and before["revealed"] is False
    # replacing the activity before its start keeps the published commitment
    again = await client.post(
        "/admin/v1/activities", json={**body, "title": "Renamed"}, headers=admin_headers(settings)
    )
    assert again.status == 201
    kept = await (await client.get(url, headers=admin_headers(settings))).json()
    assert kept["commitment"] == before["commitment"]

    users = [f"v{i}" for i in range(25)]
    await asyncio.gather(*(_register(client, settings, activity_id, u) for u in users))
    await _until_started(activity)
    placed = await _drawn(client, settings, activity_id)
    after = await (await client.get(url, headers=admin_headers(settings))).json()
    assert after["drawn"] is True and after["placed"] == 25 and after["seed"] is None

    seed = sync_redis.hget(keys.draw(activity_id), "seed").decode()
    assert lottery.commitment(seed) == before["commitment"]
    assert _by_position(placed) == lottery.order(seed, users)
    assert after["order_digest"] == lottery.digest(lottery.order(seed, users))

    verified = _verify(redis_url, activity_id)
    assert verified.returncode == 0, verified.stderr
    other = lottery.new_seed()
    assert _verify(redis_url, activity_id, "--seed", other).returncode == 1
    sync_redis.hset(keys.draw(activity_id), "seed", other)  # the operator swaps the seed
    tampered = _verify(redis_url, activity_id)
    assert tampered.returncode == 1
    assert "does not match the published commitment" in tampered.stderr


async def test_the_seed_is_revealed_after_the_sale(client: Client, settings: Settings) -> None:
    body = activity_body(
        registration_opens_at=rfc3339(-7200),
        starts_at=rfc3339(-3600),
        ends_at=rfc3339(-60),
        admission="lottery",
    )
    created = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert created.status == 201
    draw = await (
        await client.get(f"/admin/v1/activities/{body['id']}/draw", headers=admin_headers(settings))
    ).json()
    assert draw["revealed"] is True and lottery.commitment(draw["seed"]) == draw["commitment"]


def _verify(redis_url: str, activity_id: str, *extra: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env["SECKILL_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "seckill", "draw", "verify", activity_id, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_bad_input_on_every_new_field_header_and_endpoint_changes_nothing(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    admin = admin_headers(settings)
    bad_definitions = [
        {"registration_opens_at": "yesterday"},
        {"registration_opens_at": rfc3339(7200)},  # after starts_at
        {"admission": "raffle"},
        {"admission": "lottery"},  # no registration window
        {"registration_opens_at": rfc3339(-60), "claim_window_s": 30},  # fcfs has no claims
        {"registration_opens_at": rfc3339(-60), "admission": "lottery", "claim_window_s": 0},
        {"registration_opens_at": rfc3339(-60), "admission": "lottery", "claim_window_s": "9"},
        {
            "registration_opens_at": rfc3339(-60),
            "admission": "lottery",
            "tiers": {"gold": {"starts_at": rfc3339(-30)}},
        },
    ]
    for overrides in bad_definitions:
        body = activity_body(starts_at=rfc3339(60), **overrides)
        response = await client.post("/admin/v1/activities", json=body, headers=admin)
        assert response.status == 400, overrides
        assert (await response.json())["error"]["code"] == "invalid_request"
        assert not sync_redis.exists(keys.meta(body["id"])), "a refused definition is not stored"

    activity = await _create(client, settings, starts_at=rfc3339(600))
    activity_id = activity["id"]
    registration = f"/api/v1/activities/{activity_id}/registration"
    for device in ("", "x" * 65, "bad device", "bad/device"):
        response = await client.post(
            registration, headers={**user_headers(settings, "u"), "X-Device-Id": device}
        )
        assert response.status == 400, device
    for raw in (b'{"quantity": 1}', b"[]", b"{", b'"x"'):
        response = await client.post(registration, data=raw, headers=user_headers(settings, "u"))
        assert response.status == 400, raw
    assert (await client.post(registration)).status == 401
    unknown = await client.post(
        "/api/v1/activities/nope/registration", headers=user_headers(settings, "u")
    )
    assert unknown.status == 404
    assert sync_redis.llen(keys.registration_order(activity_id)) == 0, "nothing registered"
    empty = await client.post(registration, data=b"{}", headers=user_headers(settings, "u"))
    assert empty.status == 201

    queue = f"/api/v1/activities/{activity_id}/queue"
    assert (await client.get(queue)).status == 401
    assert (
        await client.get("/api/v1/activities/nope/queue", headers=user_headers(settings, "u"))
    ).status == 404
    upcoming = await _queue(client, settings, activity_id, "u")
    assert upcoming["registered"] is True and upcoming["turn"] == "upcoming"
    assert upcoming["eta_s"] >= 1

    draw = f"/admin/v1/activities/{activity_id}/draw"
    assert (await client.get(draw)).status == 401
    assert (await client.get(draw, headers=admin)).status == 404, "fcfs has no draw"
    registrants = f"/admin/v1/activities/{activity_id}/registrants"
    for query in ("?limit=0", "?limit=10001", "?start=-1", "?start=x", "?page=2"):
        assert (await client.get(registrants + query, headers=admin)).status == 400, query
    assert (await client.get(registrants)).status == 401


async def test_registration_applies_the_risk_rules_to_a_parallel_burst(
    settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    rules = tmp_path / "risk.toml"
    rules.write_text('[device_accounts]\nmode = "enforce"\nmax_accounts = 2\n')
    guarded = settings.replace("risk", rules_path=str(rules))
    async with TestClient(TestServer(create_app(guarded))) as client:
        activity = await _create(client, guarded, starts_at=rfc3339(600))
        farm = {"X-Device-Id": "farm-phone"}
        answers = await asyncio.gather(
            *(_register(client, guarded, activity["id"], f"bot{i}", **farm) for i in range(8))
        )
        statuses = Counter(status for status, _ in answers)
        assert statuses == {201: 2, 403: 6}, "two accounts per device, however parallel"
        assert {b["error"]["code"] for s, b in answers if s == 403} == {"risk_refused"}
        assert sync_redis.llen(keys.registration_order(activity["id"])) == 2
        own = {"X-Device-Id": "own-phone"}
        other = await _register(client, guarded, activity["id"], "shopper", **own)
        assert other[0] == 201
        hits = await client.get("/admin/v1/risk/hits", headers=admin_headers(guarded))
        assert any(h["rule"] == "device_accounts" for h in (await hits.json())["hits"])
