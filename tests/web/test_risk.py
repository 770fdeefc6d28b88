"""Risk rules: each in enforce and shadow, bursts that try to slip past a count, the deny
list and its TTL, hot reload, hits and metrics, bad input on every new endpoint and header."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import clock, connections, keys, personal, resources, risk
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, masters, user_headers

pytestmark = pytest.mark.contract

Client = TestClient[Any, Any]
_keys = itertools.count()
DATA_KEY = personal.new_key("r1")
OFF = '[deny]\nmode = "off"\n'


def address(n: int) -> dict[str, str]:
    return {
        "name": f"Buyer {n}",
        "phone": f"1390000{n:04d}",
        "region": "Zhejiang Hangzhou",
        "detail": f"Wensan Road {n}",
    }


def rules_text(**tables: dict[str, Any]) -> str:
    """A risk.toml with these tables (values: mode and numbers)."""
    out = []
    for name, values in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in values.items()]
    return "\n".join(out) + "\n"


@pytest.fixture
def rules_path(tmp_path: Path) -> Path:
    path = tmp_path / "risk.toml"
    path.write_text(OFF)
    return path


@pytest.fixture
def risk_settings(settings: Settings, rules_path: Path, tmp_path: Path) -> Settings:
    limits = tmp_path / "limits.toml"
    limits.write_text("[default]\nuser_rate_per_s = 0\n")  # risk rules alone, no 429s
    return (
        settings.replace("risk", rules_path=str(rules_path))
        .replace("data", keys=DATA_KEY)
        .replace("limits", rules_path=str(limits))
    )


@pytest.fixture
async def gw(risk_settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(risk_settings))) as client:
        yield client


def use_rules(client: Client, path: Path, text: str) -> None:
    """Write the rules and have the gateway read them now (a new modification time)."""
    path.write_text(text)
    stamp = time.time() + next(_keys)
    os.utime(path, (stamp, stamp))
    file = client.server.app[SERVICES].risk.file
    file.maybe_reload()  # or the file watcher already did
    assert file.rules == risk.parse(text)


async def new_activity(client: Client, settings: Settings, **overrides: Any) -> str:
    body = activity_body(stock=1000, per_user_limit=100, **overrides)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201, await response.text()
    return str(body["id"])


async def buy(
    client: Client,
    settings: Settings,
    activity_id: str,
    user: str,
    *,
    device: str | None = None,
    addr: dict[str, str] | None = None,
    key: str | None = None,
) -> tuple[int, dict[str, Any]]:
    headers = user_headers(settings, user, key or f"k{next(_keys)}")
    if device is not None:
        headers["X-Device-Id"] = device
    body: dict[str, Any] = {"quantity": 1}
    if addr is not None:
        body["address"] = addr
    response = await client.post(
        f"/api/v1/activities/{activity_id}/orders", json=body, headers=headers
    )
    return response.status, await response.json()


async def burst(calls: list[Callable[[], Any]]) -> Counter[int]:
    """Fire every call at once; the status counts."""
    results = await asyncio.gather(*(call() for call in calls))
    return Counter(status for status, _ in results)


async def metric(client: Client, rule: str, mode: str) -> float:
    text = await (await client.get("/metrics")).text()
    needle = f'seckill_risk_hits_total{{mode="{mode}",rule="{rule}"}} '
    for line in text.splitlines():
        if line.startswith(needle):
            return float(line.removeprefix(needle))
    return 0.0


async def hits(client: Client, settings: Settings) -> list[dict[str, Any]]:
    response = await client.get("/admin/v1/risk/hits?limit=1000", headers=admin_headers(settings))
    assert response.status == 200
    listed: list[dict[str, Any]] = (await response.json())["hits"]
    return listed


# -- X-Device-Id -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a" * 65, "has space", "semi;colon", "dot.ted"])
async def test_a_bad_device_id_is_400_and_reserves_nothing(
    gw: Client, risk_settings: Settings, sync_redis: redis.Redis, bad: str
) -> None:
    activity_id = await new_activity(gw, risk_settings)
    status, body = await buy(gw, risk_settings, activity_id, "u1", device=bad)
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert "X-Device-Id" in body["error"]["message"]
    assert int(sync_redis.get(keys.stock(activity_id)) or 0) == 1000
    assert (await buy(gw, risk_settings, activity_id, "u1"))[0] == 202, "absent is allowed"
    assert (await buy(gw, risk_settings, activity_id, "u2", device="a" * 64))[0] == 202


# -- accounts per device -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
async def test_fifty_accounts_fired_at_once_on_one_device(
    gw: Client, risk_settings: Settings, rules_path: Path, sync_redis: redis.Redis, mode: str
) -> None:
    """The invariant: at most max_accounts distinct accounts ever buy with one device."""
    use_rules(gw, rules_path, rules_text(device_accounts={"mode": mode, "max_accounts": 3}))
    activity_id = await new_activity(gw, risk_settings)
    statuses = await burst(
        [
            lambda n=n: buy(gw, risk_settings, activity_id, f"acct{n}", device="farm-1")
            for n in range(50)
        ]
    )
    if mode == "enforce":
        assert statuses == Counter({202: 3, 403: 47}), statuses
        assert await metric(gw, "device_accounts", "enforced") == 47
    else:
        assert statuses == Counter({202: 50}), statuses
        assert await metric(gw, "device_accounts", "shadow") == 47
    listed = [h for h in await hits(gw, risk_settings) if h["rule"] == "device_accounts"]
    assert len(listed) == 47
    assert {h["mode"] for h in listed} == {"enforced" if mode == "enforce" else "shadow"}
    assert {h["activity_id"] for h in listed} == {activity_id}
    subject = listed[0]["subject"]
    assert subject.startswith("device:") and "farm-1" not in subject, "shown hashed"
    # other devices are not affected; an account that bought may buy again on its device
    assert (await buy(gw, risk_settings, activity_id, "other", device="phone-2"))[0] == 202
    hashed = gw.server.app[SERVICES].risk.hashing.hash("device", "farm-1")
    bought = [m.decode() for m in sync_redis.smembers(keys.risk_devices(activity_id, hashed))]
    assert len(bought) == (3 if mode == "enforce" else 50)
    assert (await buy(gw, risk_settings, activity_id, bought[0], device="farm-1"))[0] == 202


async def test_a_refusal_never_names_the_rule(
    gw: Client, risk_settings: Settings, rules_path: Path
) -> None:
    use_rules(gw, rules_path, rules_text(device_accounts={"mode": "enforce", "max_accounts": 1}))
    activity_id = await new_activity(gw, risk_settings)
    assert (await buy(gw, risk_settings, activity_id, "a", device="d"))[0] == 202
    status, body = await buy(gw, risk_settings, activity_id, "b", device="d")
    assert status == 403 and body["error"]["code"] == "risk_refused"
    message = body["error"]["message"].lower()
    assert not any(word in message for word in ("device", "account", "velocity", "address"))


# -- orders per address --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
async def test_twenty_orders_fired_at_once_to_one_address(
    gw: Client, risk_settings: Settings, rules_path: Path, mode: str
) -> None:
    """The invariant: at most max_orders orders are ever created for one address hash."""
    use_rules(gw, rules_path, rules_text(address_orders={"mode": mode, "max_orders": 2}))
    activity_id = await new_activity(gw, risk_settings)
    warehouse = address(7)
    statuses = await burst(
        [
            lambda n=n: buy(gw, risk_settings, activity_id, f"u{n}", device=f"d{n}", addr=warehouse)
            for n in range(20)
        ]
    )
    if mode == "enforce":
        assert statuses == Counter({202: 2, 403: 18}), statuses
    else:
        assert statuses == Counter({202: 20}), statuses
    mode_label = "enforced" if mode == "enforce" else "shadow"
    assert await metric(gw, "address_orders", mode_label) == 18
    listed = [h for h in await hits(gw, risk_settings) if h["rule"] == "address_orders"]
    assert listed and all(h["subject"].startswith("address:") for h in listed)
    assert all("Wensan" not in h["subject"] for h in listed)
    # the same address spelt differently is the same address (the keyed hash is normalised)
    respelt = {**warehouse, "detail": "  WENSAN   road 7 "}
    status, _ = await buy(gw, risk_settings, activity_id, "late", addr=respelt)
    assert status == (403 if mode == "enforce" else 202)
    assert (await buy(gw, risk_settings, activity_id, "elsewhere", addr=address(8)))[0] == 202


# -- velocity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
@pytest.mark.parametrize("kind", ["user", "device", "ip"])
async def test_velocity_holds_a_burst_to_max_attempts(
    gw: Client, risk_settings: Settings, rules_path: Path, kind: str, mode: str
) -> None:
    """20 attempts at once by one subject: exactly max_attempts get past the rule."""
    use_rules(
        gw,
        rules_path,
        rules_text(**{f"{kind}_velocity": {"mode": mode, "window_s": 60, "max_attempts": 5}}),
    )
    activity_id = await new_activity(gw, risk_settings)

    def attempt(n: int) -> Callable[[], Any]:
        user = "solo" if kind == "user" else f"u{n}"
        device = "shared" if kind == "device" else f"d{n}"
        return lambda: buy(gw, risk_settings, activity_id, user, device=device)

    statuses = await burst([attempt(n) for n in range(20)])
    if mode == "enforce":
        assert statuses == Counter({202: 5, 403: 15}), statuses
        assert await metric(gw, f"{kind}_velocity", "enforced") == 15
    else:
        assert statuses == Counter({202: 20}), statuses
        assert await metric(gw, f"{kind}_velocity", "shadow") == 15
    # velocity spans activities: the subject is still over the rate on another activity
    other = await new_activity(gw, risk_settings)
    if kind == "user":
        status, _ = await buy(gw, risk_settings, other, "solo", device="d99")
    elif kind == "device":
        status, _ = await buy(gw, risk_settings, other, "u99", device="shared")
    else:
        status, _ = await buy(gw, risk_settings, other, "u99", device="d99")
    assert status == (403 if mode == "enforce" else 202)


# -- deny list ------------------------------------------------------------------------------


async def test_a_denied_user_is_refused_until_the_ttl_runs_out(
    gw: Client, risk_settings: Settings, rules_path: Path
) -> None:
    use_rules(gw, rules_path, rules_text(deny={"mode": "enforce"}))
    activity_id = await new_activity(gw, risk_settings)
    admin = admin_headers(risk_settings)
    put = await gw.put(
        "/admin/v1/risk/deny/user/scalper-7", json={"ttl_s": 2, "reason": "farm"}, headers=admin
    )
    assert put.status == 200, await put.text()
    entry = await put.json()
    assert entry["kind"] == "user" and entry["expires_at"] and entry["reason"] == "farm"
    assert "scalper-7" not in entry["subject"], "stored and shown hashed"
    status, body = await buy(gw, risk_settings, activity_id, "scalper-7")
    assert status == 403 and body["error"]["code"] == "risk_refused"
    assert (await buy(gw, risk_settings, activity_id, "shopper"))[0] == 202
    listing = await (await gw.get("/admin/v1/risk/deny", headers=admin)).json()
    assert [e["subject"] for e in listing["entries"]] == [entry["subject"]]
    # the TTL: wait on the condition, with a generous margin
    deadline = time.monotonic() + 30
    while (await buy(gw, risk_settings, activity_id, "scalper-7"))[0] == 403:
        assert time.monotonic() < deadline, "the deny entry outlived its TTL"
        await asyncio.sleep(0.2)
    listing = await (await gw.get("/admin/v1/risk/deny", headers=admin)).json()
    assert listing["entries"] == []
    audit = await (await gw.get("/admin/v1/risk/audit", headers=admin)).json()
    assert audit["entries"][0]["action"] == "put" and audit["entries"][0]["ttl_s"] == 2
    assert audit["entries"][0]["who"].startswith("admin-api:")


@pytest.mark.parametrize(
    ("kind", "value", "request_as"),
    [("device", "farm-9", {"device": "farm-9"}), ("ip", "127.0.0.1", {})],
)
async def test_deny_a_device_or_an_ip_then_delete_it(
    gw: Client,
    risk_settings: Settings,
    rules_path: Path,
    kind: str,
    value: str,
    request_as: dict[str, str],
) -> None:
    use_rules(gw, rules_path, rules_text(deny={"mode": "enforce"}))
    activity_id = await new_activity(gw, risk_settings)
    admin = admin_headers(risk_settings)
    url = f"/admin/v1/risk/deny/{kind}/{value}"
    assert (await gw.put(url, json={}, headers=admin)).status == 200
    assert (await buy(gw, risk_settings, activity_id, "u1", **request_as))[0] == 403
    if kind == "device":
        assert (await buy(gw, risk_settings, activity_id, "u1", device="other"))[0] == 202
    deleted = await gw.delete(url, headers=admin)
    assert (await deleted.json())["deleted"] is True
    assert (await buy(gw, risk_settings, activity_id, "u2", **request_as))[0] == 202
    again = await gw.delete(url, headers=admin)
    assert (await again.json())["deleted"] is False
    actions = [
        e["action"]
        for e in (await (await gw.get("/admin/v1/risk/audit", headers=admin)).json())["entries"]
    ]
    assert actions == ["delete", "delete", "put"]


async def test_a_resync_in_flight_never_brings_back_a_deleted_entry(
    gw: Client, risk_settings: Settings, rules_path: Path
) -> None:
    """Once DELETE answered, the process that took it refuses nobody for that subject.

    A resync that read the list before the DELETE and finished after it put the subject back
    until the next resync (CI failed on it once): here resyncs are in flight around every
    change, as the announcement of the previous change starts one.
    """
    use_rules(gw, rules_path, rules_text(deny={"mode": "enforce"}))
    deny = gw.server.app[SERVICES].risk.deny
    admin = admin_headers(risk_settings)
    hashed = deny.member("device", "farm-3").partition(":")[2]
    for _ in range(40):
        assert (await gw.put("/admin/v1/risk/deny/device/farm-3", json={}, headers=admin)).ok
        resyncs = [asyncio.ensure_future(deny.load()) for _ in range(4)]
        await asyncio.sleep(0)  # each has sent its first read
        assert (await gw.delete("/admin/v1/risk/deny/device/farm-3", headers=admin)).ok
        assert not deny.denied("device", hashed, clock.now_ms()), "a stale resync won"
        await asyncio.gather(*resyncs)
        assert not deny.denied("device", hashed, clock.now_ms()), "a stale resync won"


async def test_the_deny_list_reaches_every_gateway(
    risk_settings: Settings, rules_path: Path
) -> None:
    """Listed through one process, refused by another within a second or so."""
    rules_path.write_text(rules_text(deny={"mode": "enforce"}))
    async with (
        TestClient(TestServer(create_app(risk_settings))) as first,
        TestClient(TestServer(create_app(risk_settings))) as second,
    ):
        activity_id = await new_activity(first, risk_settings)
        put = await first.put(
            "/admin/v1/risk/deny/user/bot-1",
            json={"ttl_s": 600},
            headers=admin_headers(risk_settings),
        )
        assert put.status == 200
        deadline = time.monotonic() + 10
        while (await buy(second, risk_settings, activity_id, "bot-1"))[0] != 403:
            assert time.monotonic() < deadline, "the other gateway never saw the deny entry"
            await asyncio.sleep(0.1)


async def test_deny_in_shadow_mode_lists_the_hit_and_sells(
    gw: Client, risk_settings: Settings, rules_path: Path
) -> None:
    use_rules(gw, rules_path, rules_text(deny={"mode": "shadow"}))
    activity_id = await new_activity(gw, risk_settings)
    await gw.put("/admin/v1/risk/deny/user/watched", json={}, headers=admin_headers(risk_settings))
    assert (await buy(gw, risk_settings, activity_id, "watched"))[0] == 202
    listed = await hits(gw, risk_settings)
    assert [(h["rule"], h["mode"]) for h in listed] == [("deny_user", "shadow")]
    assert await metric(gw, "deny_user", "shadow") == 1


async def test_check_order_replay_then_switches_then_risk_then_rate_limits(
    risk_settings: Settings, rules_path: Path, tmp_path: Path
) -> None:
    rules_path.write_text(rules_text(deny={"mode": "enforce"}))
    limits = tmp_path / "limits.toml"
    limits.write_text("[default]\nuser_rate_per_s = 0.01\nuser_burst = 1\n")
    settings = risk_settings.replace("limits", rules_path=str(limits))
    async with TestClient(TestServer(create_app(settings))) as client:
        activity_id = await new_activity(client, settings)
        admin = admin_headers(settings)
        status, first = await buy(client, settings, activity_id, "u1", key="same")
        assert status == 202
        await client.put("/admin/v1/risk/deny/user/u1", json={}, headers=admin)
        # idempotency first: the earlier 202 still replays for a denied user
        status, replay = await buy(client, settings, activity_id, "u1", key="same")
        assert status == 202 and replay["order_id"] == first["order_id"]
        # risk before rate limits: u1's bucket is empty, the answer is still 403
        status, body = await buy(client, settings, activity_id, "u1")
        assert status == 403 and body["error"]["code"] == "risk_refused"
        # switches before risk
        await client.put("/admin/v1/flags/seckill.enabled", json={"value": False}, headers=admin)
        status, body = await buy(client, settings, activity_id, "u1")
        assert status == 503 and body["error"]["code"] == "degraded"


async def test_a_denied_user_is_refused_on_the_sold_out_fast_path_too(
    gw: Client, risk_settings: Settings, rules_path: Path
) -> None:
    use_rules(gw, rules_path, rules_text(deny={"mode": "enforce"}))
    body = activity_body(stock=1, per_user_limit=1)
    await gw.post("/admin/v1/activities", json=body, headers=admin_headers(risk_settings))
    activity_id = str(body["id"])
    assert (await buy(gw, risk_settings, activity_id, "winner"))[0] == 202
    assert (await buy(gw, risk_settings, activity_id, "late"))[1]["error"]["code"] == "sold_out"
    await gw.put("/admin/v1/risk/deny/user/late", json={}, headers=admin_headers(risk_settings))
    status, answer = await buy(gw, risk_settings, activity_id, "late")
    assert status == 403 and answer["error"]["code"] == "risk_refused"


# -- hot reload -----------------------------------------------------------------------------------


async def test_a_bad_reload_is_counted_and_the_rules_in_force_stay(
    gw: Client, risk_settings: Settings, rules_path: Path
) -> None:
    use_rules(gw, rules_path, rules_text(device_accounts={"mode": "enforce", "max_accounts": 1}))
    activity_id = await new_activity(gw, risk_settings)
    file = gw.server.app[SERVICES].risk.file
    before = file.rules
    for n, broken in enumerate(
        [
            "[device_accounts\nmode = ",
            '[device_accounts]\nmode = "loud"\nmax_accounts = 1\n',
            '[device_accounts]\nmode = "enforce"\nmax_accounts = 0\n',
            '[device_accounts]\nmode = "enforce"\n',
            '[device_accounts]\nmode = "enforce"\nmax_acounts = 1\n',
            '[user_velocity]\nmode = "enforce"\nmax_attempts = 5\n',
            "[surprise]\n",
        ],
        start=1,
    ):
        rules_path.write_text(broken)
        stamp = time.time() + 100 + n
        os.utime(rules_path, (stamp, stamp))
        assert file.maybe_reload() is False, broken
        assert file.rules == before
        assert file.reload_errors == n
    text = await (await gw.get("/metrics")).text()
    assert "seckill_risk_reload_errors_total 7.0" in text
    assert (await buy(gw, risk_settings, activity_id, "a", device="d"))[0] == 202
    assert (await buy(gw, risk_settings, activity_id, "b", device="d"))[0] == 403, "still in force"
    # a good file takes over: the rule off, the second account buys
    use_rules(gw, rules_path, rules_text(device_accounts={"mode": "off", "max_accounts": 1}))
    assert (await buy(gw, risk_settings, activity_id, "b", device="d"))[0] == 202


def test_the_shipped_rules_parse_and_enforce_what_the_rehearsal_needs() -> None:
    shipped = risk.parse(resources.risk_path().read_text())
    assert shipped.deny.mode == "enforce"
    assert shipped.device_accounts.mode == "enforce" and shipped.device_accounts.most >= 2
    assert shipped.address_orders.mode == "enforce" and shipped.address_orders.most >= 2
    assert shipped.ip_velocity.mode != "enforce", "carriers put many shoppers behind one IP"


# -- bad input on the admin endpoints -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("PUT", "/admin/v1/risk/deny/planet/x", {}, 400),
        ("PUT", "/admin/v1/risk/deny/device/bad.device", {}, 400),
        ("PUT", "/admin/v1/risk/deny/device/" + "d" * 65, {}, 400),
        ("PUT", "/admin/v1/risk/deny/ip/300.1.1.1", {}, 400),
        ("PUT", "/admin/v1/risk/deny/user/" + "u" * 65, {}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", {"ttl_s": 0}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", {"ttl_s": None}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", {"ttl_s": "60"}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", {"ttl_s": True}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", {"ttl_s": 10**9}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", {"reason": 5}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", {"reason": "r" * 201}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", {"ttl": 60}, 400),
        ("PUT", "/admin/v1/risk/deny/user/u", [1], 400),
        ("DELETE", "/admin/v1/risk/deny/planet/x", None, 400),
        ("DELETE", "/admin/v1/risk/deny/ip/not-an-ip", None, 400),
        ("GET", "/admin/v1/risk/hits?limit=0", None, 400),
        ("GET", "/admin/v1/risk/hits?limit=x", None, 400),
        ("GET", "/admin/v1/risk/hits?since=1", None, 400),
        ("GET", "/admin/v1/risk/deny?limit=1001", None, 400),
        ("GET", "/admin/v1/risk/audit?limit=-1", None, 400),
    ],
)
async def test_bad_admin_input_is_400_and_changes_nothing(
    gw: Client,
    risk_settings: Settings,
    sync_redis: redis.Redis,
    method: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    response = await gw.request(method, path, json=body, headers=admin_headers(risk_settings))
    assert response.status == status, await response.text()
    assert (await response.json())["error"]["code"] == "invalid_request"
    assert not sync_redis.exists(keys.RISK_DENY, keys.RISK_AUDIT, keys.RISK_DENY_VERSION)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/admin/v1/risk/deny/user/u"),
        ("DELETE", "/admin/v1/risk/deny/user/u"),
        ("GET", "/admin/v1/risk/deny"),
        ("GET", "/admin/v1/risk/audit"),
        ("GET", "/admin/v1/risk/hits"),
    ],
)
async def test_risk_admin_needs_the_admin_token(
    gw: Client, sync_redis: redis.Redis, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = await gw.request(method, path, json={}, headers=headers)
        assert response.status == 401
    assert not sync_redis.exists(keys.RISK_DENY, keys.RISK_AUDIT)


def test_subjects_are_hashed_with_a_key() -> None:
    one = risk.Hashing(b"k" * 32)
    other = risk.Hashing(b"j" * 32)
    assert one.hash("device", "d1") == one.hash("device", "d1")
    assert one.hash("device", "d1") != other.hash("device", "d1")
    assert one.hash("device", "d1") != one.hash("user", "d1"), "kinds never collide"
    assert one.subject("u", "", "::ffff:10.0.0.1").ip == one.subject("u", "", "10.0.0.1").ip


async def test_one_activity_may_hold_its_own_device_rule(
    gw: Client, risk_settings: Settings, rules_path: Path
) -> None:
    strict = await new_activity(gw, risk_settings)
    lenient = await new_activity(gw, risk_settings)
    use_rules(
        gw,
        rules_path,
        rules_text(device_accounts={"mode": "enforce", "max_accounts": 3})
        + f'[activity.{strict}.device_accounts]\nmode = "enforce"\nmax_accounts = 1\n',
    )
    for activity_id, accepted in ((strict, 1), (lenient, 3)):
        statuses = Counter(
            [
                (await buy(gw, risk_settings, activity_id, f"a{n}", device="tablet"))[0]
                for n in range(4)
            ]
        )
        assert statuses == Counter({202: accepted, 403: 4 - accepted}), (activity_id, statuses)


def test_velocity_cannot_be_set_per_activity() -> None:
    with pytest.raises(ValueError, match="cannot be set per activity"):
        risk.parse('[activity.x.user_velocity]\nmode = "off"\nwindow_s = 1\nmax_attempts = 1\n')


@pytest.mark.parametrize("one_call", [True, False])
async def test_velocity_of_several_subjects_in_one_call_or_one_per_subject(
    gw: Client, risk_settings: Settings, rules_path: Path, one_call: bool
) -> None:
    """One Redis takes every counter in one call; Redis Cluster needs one call per subject
    (each counter in its own slot): both count the same."""
    if one_call and connections.is_cluster(gw.server.app[SERVICES].redis):
        pytest.skip("a cluster counts velocity per subject: its gateway never takes one call")
    gw.server.app[SERVICES].risk.one_call = one_call
    use_rules(
        gw,
        rules_path,
        rules_text(
            user_velocity={"mode": "enforce", "window_s": 60, "max_attempts": 2},
            device_velocity={"mode": "shadow", "window_s": 60, "max_attempts": 3},
        ),
    )
    activity_id = await new_activity(gw, risk_settings)
    statuses = [
        (await buy(gw, risk_settings, activity_id, "same", device="same"))[0] for _ in range(4)
    ]
    assert statuses == [202, 202, 403, 403]
    assert await metric(gw, "user_velocity", "enforced") == 2
    assert await metric(gw, "device_velocity", "shadow") == 1


async def test_a_full_redis_still_replays_with_velocity_on(
    gw: Client, risk_settings: Settings, rules_path: Path, sync_redis: redis.Redis
) -> None:
    """At maxmemory the velocity count is refused like the purchase: a new order is 503, an
    accepted order's retry still replays (velocity never hides it)."""
    use_rules(
        gw,
        rules_path,
        rules_text(user_velocity={"mode": "enforce", "window_s": 60, "max_attempts": 5}),
    )
    activity_id = await new_activity(gw, risk_settings)
    status, first = await buy(gw, risk_settings, activity_id, "a", key="k")
    assert status == 202
    nodes = masters(sync_redis)
    previous = [node.config_get("maxmemory")["maxmemory"] for node in nodes]
    for node in nodes:
        node.config_set("maxmemory", 1)
    try:
        status, body = await buy(gw, risk_settings, activity_id, "b", key="k")
        assert status == 503 and body["error"]["code"] == "overloaded"
        status, replay = await buy(gw, risk_settings, activity_id, "a", key="k")
        assert status == 202 and replay["order_id"] == first["order_id"]
    finally:
        for node, value in zip(nodes, previous, strict=True):
            node.config_set("maxmemory", value)
