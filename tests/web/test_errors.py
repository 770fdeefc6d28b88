"""Every contract error on the purchase path: exact status and code, and no state changed."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import keys
from seckill.embedded import free_port
from seckill.settings import Settings
from seckill.web.app import create_app
from tests.helpers import activity_body, admin_headers, rfc3339, user_headers

Client = TestClient[Any, Any]


async def _activity(client: Client, settings: Settings, **overrides: Any) -> str:
    body = activity_body(stock=5, per_user_limit=2, **overrides)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201, await response.text()
    return str(body["id"])


def _state(sync_redis: redis.Redis, activity_id: str) -> tuple[Any, ...]:
    return (
        sync_redis.get(keys.stock(activity_id)),
        sync_redis.xlen(keys.stream(activity_id)),
        sync_redis.hgetall(keys.holders(activity_id)),
        sync_redis.hgetall(keys.counters(activity_id)),
    )


async def _expect(response: Any, status: int, code: str) -> dict[str, Any]:
    body = await response.json()
    assert response.status == status, body
    assert response.headers["Content-Type"].startswith("application/json")
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body)


@pytest.fixture
async def live(client: Client, settings: Settings, sync_redis: redis.Redis) -> Any:
    activity_id = await _activity(client, settings)
    before = _state(sync_redis, activity_id)
    yield activity_id
    assert _state(sync_redis, activity_id) == before, "a refused request changed state"


def _token(settings: Settings, **claims: Any) -> str:
    payload = {"sub": "u1", "exp": int(time.time()) + 600, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, settings.jwt.secret, algorithm="HS256")


BAD_BODIES = [
    ("not json", b"{quantity: 1"),
    ("not an object", b"[1]"),
    ("string", b'{"quantity": "1"}'),
    ("float", b'{"quantity": 1.5}'),
    ("bool", b'{"quantity": true}'),
    ("null", b'{"quantity": null}'),
    ("list", b'{"quantity": [1]}'),
    ("zero", b'{"quantity": 0}'),
    ("negative", b'{"quantity": -1}'),
    ("missing", b"{}"),
    ("unknown field", b'{"quantity": 1, "coupon": "x"}'),
    ("empty", b""),
    ("not utf-8", b'{"quantity": "\xff"}'),
]


@pytest.mark.parametrize(("name", "raw"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_malformed_body_is_invalid_request(
    client: Client, settings: Settings, live: str, name: str, raw: bytes
) -> None:
    response = await client.post(
        f"/api/v1/activities/{live}/orders", data=raw, headers=user_headers(settings, "u1", "k1")
    )
    await _expect(response, 400, "invalid_request")


@pytest.mark.parametrize("quantity", [3, 10**30], ids=["over limit", "huge"])
async def test_quantity_over_per_user_limit_is_invalid_request(
    client: Client, settings: Settings, live: str, quantity: int
) -> None:
    response = await client.post(
        f"/api/v1/activities/{live}/orders",
        data=json.dumps({"quantity": quantity}),
        headers=user_headers(settings, "u1", "k1"),
    )
    await _expect(response, 400, "invalid_request")


@pytest.mark.parametrize("key", [None, "", "has space", "x" * 65, "ключ", "a/b"])
async def test_bad_idempotency_key_is_invalid_request(
    client: Client, settings: Settings, live: str, key: str | None
) -> None:
    headers = user_headers(settings, "u1")
    if key is not None:
        headers["Idempotency-Key"] = key
    response = await client.post(
        f"/api/v1/activities/{live}/orders", json={"quantity": 1}, headers=headers
    )
    await _expect(response, 400, "invalid_request")


async def test_oversize_body_is_413_but_auth_comes_first(
    client: Client, settings: Settings, live: str
) -> None:
    raw = json.dumps({"quantity": 1, "pad": "x" * 5000}).encode()
    url = f"/api/v1/activities/{live}/orders"
    await _expect(await client.post(url, data=raw), 401, "unauthorized")
    response = await client.post(url, data=raw, headers=user_headers(settings, "u1", "k1"))
    await _expect(response, 413, "payload_too_large")


def _bad_tokens(settings: Settings) -> dict[str, str | None]:
    none_alg = jwt.encode({"sub": "u1", "exp": int(time.time()) + 600}, None, algorithm="none")
    return {
        "missing": None,
        "not bearer": f"Basic {_token(settings)}",
        "malformed": "Bearer not.a.jwt",
        "empty": "Bearer ",
        "forged": "Bearer "
        + jwt.encode(
            {"sub": "u1", "exp": int(time.time()) + 600},
            "another-secret-of-32-bytes-long!!",
            "HS256",
        ),
        # past the 30 s clock-skew leeway ([jwt] leeway_s)
        "expired": "Bearer " + _token(settings, exp=int(time.time()) - 120),
        "alg none": f"Bearer {none_alg}",
        "no exp": "Bearer " + _token(settings, exp=None),
        "no sub": "Bearer " + _token(settings, sub=None),
        "sub too long": "Bearer " + _token(settings, sub="u" * 65),
        "HS512": "Bearer "
        + jwt.encode({"sub": "u1", "exp": int(time.time()) + 600}, settings.jwt.secret, "HS512"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not bearer",
        "malformed",
        "empty",
        "forged",
        "expired",
        "alg none",
        "no exp",
        "no sub",
        "sub too long",
        "HS512",
    ],
)
async def test_bad_token_is_unauthorized(
    client: Client, settings: Settings, live: str, case: str
) -> None:
    header = _bad_tokens(settings)[case]
    headers = {"Idempotency-Key": "k1"}
    if header is not None:
        headers["Authorization"] = header
    response = await client.post(
        f"/api/v1/activities/{live}/orders", json={"quantity": 1}, headers=headers
    )
    await _expect(response, 401, "unauthorized")
    response = await client.get(f"/api/v1/orders/{live}.{'0' * 20}", headers=headers)
    await _expect(response, 401, "unauthorized")


@pytest.mark.parametrize("activity_id", ["nope", "bad id!", "x" * 65])
async def test_unknown_activity_is_not_found(
    client: Client, settings: Settings, activity_id: str
) -> None:
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, "u1", "k1"),
    )
    await _expect(response, 404, "not_found")
    await _expect(await client.get(f"/api/v1/activities/{activity_id}"), 404, "not_found")


@pytest.mark.parametrize(
    ("window", "code"),
    [((600, 1200), "not_started"), ((-1200, -600), "ended")],
)
async def test_outside_the_window_is_refused(
    client: Client, settings: Settings, sync_redis: redis.Redis, window: tuple[int, int], code: str
) -> None:
    activity_id = await _activity(
        client, settings, starts_at=rfc3339(window[0]), ends_at=rfc3339(window[1])
    )
    before = _state(sync_redis, activity_id)
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, "u1", "k1"),
    )
    await _expect(response, 409, code)
    assert _state(sync_redis, activity_id) == before


async def test_replacing_a_started_activity_is_conflict(
    client: Client, settings: Settings, sync_redis: redis.Redis, live: str
) -> None:
    body = activity_body(id=live, stock=999)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    await _expect(response, 409, "conflict")
    assert int(sync_redis.get(keys.stock(live))) == 5


async def test_replacing_an_upcoming_activity_reloads_its_stock(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    upcoming = {"starts_at": rfc3339(600), "ends_at": rfc3339(1200)}
    activity_id = await _activity(client, settings, **upcoming)
    body = activity_body(id=activity_id, stock=77, **upcoming)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201
    assert (await response.json())["stock_left"] == 77
    assert int(sync_redis.get(keys.stock(activity_id))) == 77


ADMIN_BAD_FIELDS: list[Any] = [
    ("id", "has space"),
    ("id", ""),
    ("sku_id", 5),
    ("title", ""),
    ("price_cents", -1),
    ("price_cents", 1.5),
    ("stock", -1),
    ("stock", True),
    ("per_user_limit", 0),
    ("starts_at", "yesterday"),
    ("starts_at", "2026-11-22T10:00:00"),
    # named: an id with the time in it would differ between the xdist workers' collections
    pytest.param("ends_at", rfc3339(-3600), id="ends_at-an-hour-ago"),
    ("payment_timeout_s", 0),
    ("surprise", 1),
]


@pytest.mark.parametrize(("field", "value"), ADMIN_BAD_FIELDS)
async def test_admin_bad_activity_is_invalid_request(
    client: Client, settings: Settings, sync_redis: redis.Redis, field: str, value: Any
) -> None:
    body = activity_body(starts_at=rfc3339(-60))
    body[field] = value
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    await _expect(response, 400, "invalid_request")
    assert sync_redis.dbsize() == 0, "nothing was written"


async def test_admin_missing_field_and_bad_json(client: Client, settings: Settings) -> None:
    body = activity_body()
    del body["stock"]
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    await _expect(response, 400, "invalid_request")
    response = await client.post("/admin/v1/activities", data=b"{", headers=admin_headers(settings))
    await _expect(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "dev-only-admin-token-change-me-0123456789"]
)
async def test_admin_without_the_token_is_unauthorized(
    client: Client, sync_redis: redis.Redis, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    response = await client.post("/admin/v1/activities", json=activity_body(), headers=headers)
    await _expect(response, 401, "unauthorized")
    assert sync_redis.dbsize() == 0


async def test_users_cannot_read_each_others_orders(client: Client, settings: Settings) -> None:
    live = await _activity(client, settings)
    response = await client.post(
        f"/api/v1/activities/{live}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, "alice", "k1"),
    )
    assert response.status == 202
    order_id = (await response.json())["order_id"]
    mine = await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(settings, "alice"))
    assert mine.status == 200
    order = await mine.json()
    assert (
        order["user_id"] == "alice" and order["status"] == "reserved" and order["paid_at"] is None
    )
    theirs = await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(settings, "bob"))
    await _expect(theirs, 404, "not_found")
    for missing in (f"{live}.{'0' * 20}", "garbage", f"nope.{'a' * 20}"):
        response = await client.get(
            f"/api/v1/orders/{missing}", headers=user_headers(settings, "alice")
        )
        await _expect(response, 404, "not_found")


async def test_unknown_route_and_wrong_method(client: Client) -> None:
    await _expect(await client.get("/api/v1/nothing-here"), 404, "not_found")
    response = await client.delete("/api/v1/activities/x")
    await _expect(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]


async def test_redis_down_fails_closed_with_retry_after(settings: Settings) -> None:
    dead = settings.replace("redis", url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2)
    async with TestClient(TestServer(create_app(dead))) as client:
        response = await client.post(
            "/api/v1/activities/a1/orders",
            json={"quantity": 1},
            headers=user_headers(dead, "u1", "k1"),
        )
        await _expect(response, 503, "overloaded")
        assert int(response.headers["Retry-After"]) >= 1
        response = await client.get("/readyz")
        await _expect(response, 503, "overloaded")
        assert "Retry-After" in response.headers
        assert (await client.get("/healthz")).status == 200


async def test_a_body_arriving_in_pieces_is_read_whole(client: Client, settings: Settings) -> None:
    """Mobile networks deliver bodies in several segments: all of them must be read."""
    activity_id = await _activity(client, settings)

    async def pieces() -> Any:
        for part in (b'{"quan', b'tity": ', b"1}"):
            yield part
            await asyncio.sleep(0.05)

    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        data=pieces(),
        headers=user_headers(settings, "u1", "k1"),
    )
    assert response.status == 202, await response.text()
    oversize = b"x" * 3000

    async def big() -> Any:
        yield b'{"quantity": 1, "pad": "'
        yield oversize
        yield oversize
        yield b'"}'

    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        data=big(),
        headers=user_headers(settings, "u2", "k1"),
    )
    await _expect(response, 413, "payload_too_large")
