"""Hot-SKU buckets: one item's stock split over key spaces in as many slots.

Invariants: nothing oversold, no user over the limit, and no buyer told sold_out while the
buckets together still held what they asked for (no phantom sold-out); a stock move cut short
between its two halves is finished by the sweeper, nothing lost; the report adds the buckets
up and stays consistent.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

import msgpack
import redis
from aiohttp.test_utils import TestClient

from seckill import buckets, keys
from seckill.auth import PaymentSignature
from seckill.orders.sweeper import Sweeper
from seckill.orders.writer import Writer, WriterConfig
from seckill.scripts import Scripts
from seckill.settings import Settings
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, loops_alive, redis_commands, user_headers

Client = TestClient[Any, Any]
SCRIPTS = Scripts.from_dir()


async def _create(client: Client, settings: Settings, **overrides: Any) -> dict[str, Any]:
    body = activity_body(**overrides)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201, await response.text()
    return dict(await response.json())


def _orders(sync_redis: redis.Redis, activity_id: str, count: int) -> list[dict[str, Any]]:
    """Every accepted order, from every bucket's stream."""
    found = []
    for space in buckets.spaces(activity_id, count):
        for _, fields in sync_redis.xrange(keys.stream(space)):
            found.append(msgpack.unpackb(fields[b"o"], raw=False))
    return found


def _stock(sync_redis: redis.Redis, activity_id: str, count: int) -> list[int]:
    return [int(sync_redis.get(keys.stock(s)) or 0) for s in buckets.spaces(activity_id, count)]


async def test_buckets_are_validated_like_every_field(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    refused = [
        {"buckets": 0},
        {"buckets": 17},
        {"buckets": "4"},
        {"buckets": 5, "stock": 4},
        {"buckets": 2, "registration_opens_at": "2020-01-01T00:00:00Z"},
    ]
    for overrides in refused:
        body = activity_body(**overrides)
        response = await client.post(
            "/admin/v1/activities", json=body, headers=admin_headers(settings)
        )
        assert response.status == 400, overrides
        assert (await response.json())["error"]["code"] == "invalid_request"
    listed = activity_body(buckets=2)
    for field in ("sku_id", "price_cents", "stock"):
        del listed[field]
    listed["skus"] = [{"sku_id": "a", "title": "A", "price_cents": 1, "stock": 5}]
    response = await client.post(
        "/admin/v1/activities", json=listed, headers=admin_headers(settings)
    )
    assert response.status == 400

    one = await _create(client, settings, buckets=1, stock=7)
    assert "buckets" not in one and sync_redis.scard(keys.BUCKETS) == 0
    split = await _create(client, settings, buckets=3, stock=7)
    assert split["buckets"] == 3 and split["stock_left"] == 7
    assert _stock(sync_redis, split["id"], 3) == [3, 2, 2]
    assert {m.decode() for m in sync_redis.smembers(keys.BUCKETS)} == {
        f"{split['id']}.1",
        f"{split['id']}.2",
    }
    public = await client.get(f"/api/v1/activities/{split['id']}")
    assert (await public.json())["stock_left"] == 7

    # replaced before its start with fewer buckets: the dropped bucket's keys go
    upcoming = activity_body(buckets=3, stock=9, starts_at="2099-01-01T00:00:00Z")
    upcoming["ends_at"] = "2099-01-02T00:00:00Z"
    for count in (3, 2):
        upcoming["buckets"] = count
        response = await client.post(
            "/admin/v1/activities", json=upcoming, headers=admin_headers(settings)
        )
        assert response.status == 201
    assert _stock(sync_redis, upcoming["id"], 2) == [5, 4]
    assert not sync_redis.exists(keys.stock(keys.bucket(upcoming["id"], 2)))


async def test_storm_sells_exactly_the_stock_with_no_phantom_sold_out(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    stock, count, limit, users = 37, 4, 2, 400
    activity_id = (
        await _create(client, settings, stock=stock, buckets=count, per_user_limit=limit)
    )["id"]
    rng = random.Random(11)
    # nobody is homed in the last bucket: its stock reaches buyers only by moving, so a buyer
    # told sold_out while it still held some would leave it unsold
    cold = keys.bucket(activity_id, count - 1)
    names = (f"user{n}" for n in range(10 * users))
    buyers = [u for u in names if buckets.home(activity_id, count, u) != cold][:users]
    # every user fires one to three orders at once, of one or two units
    requests = [
        (user, f"k{n}", rng.choice((1, 1, 2)))
        for user in buyers
        for n in range(rng.choice((1, 1, 2, 3)))
    ]
    rng.shuffle(requests)
    answers: list[tuple[str, int, int, dict[str, Any], int]] = []

    async def buy(user: str, key: str, quantity: int) -> None:
        while True:
            response = await client.post(
                f"/api/v1/activities/{activity_id}/orders",
                json={"quantity": quantity},
                headers=user_headers(settings, user, key),
            )
            body = await response.json()
            received_ms = int(time.time() * 1000)
            if response.status != 503:  # the stock was moving: retried, as a client would
                answers.append((user, quantity, response.status, body, received_ms))
                return
            await asyncio.sleep(0.05)

    await asyncio.gather(*(buy(*r) for r in requests))

    orders = _orders(sync_redis, activity_id, count)
    accepted = [a for a in answers if a[2] == 202]
    assert len(orders) == len(accepted), "every 202 is one queued order, and only those"
    assert sum(o["quantity"] for o in orders) == stock, "exactly the stock is sold"
    assert _stock(sync_redis, activity_id, count) == [0] * count
    per_user: Counter[str] = Counter()
    for order in orders:
        per_user[order["user_id"]] += order["quantity"]
        assert order["activity_id"] == activity_id
    assert max(per_user.values()) <= limit, "no user over the limit"
    holders: Counter[str] = Counter()
    for space in buckets.spaces(activity_id, count):
        holders.update(
            {k.decode(): int(v) for k, v in sync_redis.hgetall(keys.holders(space)).items()}
        )
    assert holders == per_user
    assert len({o["user_id"] for o in orders}) > count, "the buckets really shared the sale"
    moved_out = int(sync_redis.hget(keys.counters(cold), "moved_out") or 0)
    assert moved_out == stock // count, "the cold bucket's stock was sold by moving it"
    codes = Counter(a[3]["error"]["code"] for a in answers if a[2] != 202)
    assert set(codes) <= {"sold_out", "limit_reached"} and codes["sold_out"] > 0

    # no phantom sold-out: with no cancels, what is left only falls; a sold_out to a buyer of
    # q units is due only once fewer than q were left, at the Redis time of the order that
    # left fewer than q. An answer received before that moment was decided while the buckets
    # together still held q units.
    left, fell_below = stock, {}
    for order in sorted(orders, key=lambda o: o["created_at"]):
        left -= order["quantity"]
        for q in (1, 2):
            if left < q and q not in fell_below:
                fell_below[q] = order["created_at"]
    never = 2**63  # never fell below: every sold_out to such a buyer was a phantom
    phantoms = [
        a
        for a in answers
        if a[2] == 409
        and a[3]["error"]["code"] == "sold_out"
        and a[4] < fell_below.get(a[1], never)
    ]
    assert not phantoms, f"{len(phantoms)} sold_out answers while stock was left"

    # the report adds the buckets up; with every order written it is consistent
    services = client.server.app[SERVICES]
    loops_alive(sync_redis)
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    url = f"/admin/v1/activities/{activity_id}/report"
    report = await (await client.get(url, headers=admin_headers(settings))).json()
    assert report["consistent"] is True, report["problems"]
    assert report["initial_stock"] == stock and report["available"] == 0
    assert report["reserved"] == stock and report["orders_in_store"] == len(orders)
    assert report["buckets"] == count and report["in_transit"] == 0
    gone = await client.get(f"/api/v1/activities/{activity_id}")
    assert (await gone.json())["state"] == "sold_out"


async def test_orders_of_any_bucket_are_read_cancelled_and_expired(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = (await _create(client, settings, stock=8, buckets=4, per_user_limit=2))["id"]
    placed: dict[str, str] = {}
    for n in range(8):
        user = f"u{n}"
        response = await client.post(
            f"/api/v1/activities/{activity_id}/orders",
            json={"quantity": 1},
            headers=user_headers(settings, user, "k"),
        )
        assert response.status == 202
        body = await response.json()
        assert body["activity_id"] == activity_id
        assert keys.space_of_order(body["order_id"]) == buckets.home(activity_id, 4, user)
        placed[user] = body["order_id"]
    assert len({keys.space_of_order(o) for o in placed.values()}) > 1

    for user, order_id in placed.items():
        got = await client.get(f"/api/v1/orders/{order_id}", headers=user_headers(settings, user))
        assert got.status == 200 and (await got.json())["activity_id"] == activity_id
    cancelled = [u for u in placed if keys.space_of_order(placed[u]) != activity_id][:2]
    for user in cancelled:
        response = await client.post(
            f"/api/v1/orders/{placed[user]}/cancel", headers=user_headers(settings, user)
        )
        assert response.status == 200 and (await response.json())["status"] == "cancelled"
    # one expiry, as time would bring it, in a bucket other than 0
    spaces = {u: keys.space_of_order(o) for u, o in placed.items()}
    expiring = next(u for u in placed if u not in cancelled and spaces[u] != activity_id)
    space = spaces[expiring]
    assert space is not None
    record = msgpack.unpackb(sync_redis.hget(keys.orders(space), placed[expiring]), raw=False)
    record["expires_at"] = int(time.time() * 1000) - 1
    sync_redis.hset(keys.orders(space), placed[expiring], msgpack.packb(record))
    sync_redis.zadd(keys.deadlines(space), {placed[expiring]: record["expires_at"]})
    services = client.server.app[SERVICES]
    assert await Sweeper(services.stock).sweep() == 1
    # one payment, in yet another bucket than 0
    paying = next(
        u for u in placed if u not in cancelled and u != expiring and spaces[u] != activity_id
    )
    raw = json.dumps(
        {
            "event_id": "ev-1",
            "order_id": placed[paying],
            "amount_cents": 199_900,
            "status": "SUCCESS",
        }
    ).encode()
    signature = PaymentSignature(settings.payment.secret, 300).sign(raw)
    paid = await client.post(
        "/api/v1/payments/notify", data=raw, headers={"Seckill-Signature": signature}
    )
    assert (await paid.json()) == {"result": "paid"}

    loops_alive(sync_redis)
    await Writer(services.redis, services.store, WriterConfig(block_ms=10), "w").drain()
    url = f"/admin/v1/activities/{activity_id}/report"
    report = await (await client.get(url, headers=admin_headers(settings))).json()
    assert report["consistent"] is True, report["problems"]
    assert (report["available"], report["reserved"], report["paid"]) == (3, 4, 1)
    assert report["released"] == 3
    for user, order_id in placed.items():
        stored = await services.store.order(order_id)
        assert stored is not None and stored.user_id == user


async def test_a_move_cut_short_is_finished_by_the_sweeper(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = (await _create(client, settings, stock=6, buckets=2, per_user_limit=6))["id"]
    giver, taker = keys.bucket(activity_id, 1), keys.bucket(activity_id, 0)
    # the giving half only, as if its mover died before the receiving half
    sync_redis.script_load(SCRIPTS.transfer_out.source)
    moved, _ = sync_redis.evalsha(
        SCRIPTS.transfer_out.sha, 3, *keys.transfer_out_keys(giver), "t1", taker, 2
    )
    assert moved == 2 and _stock(sync_redis, activity_id, 2) == [3, 1]
    services = client.server.app[SERVICES]
    assert await services.stock.buckets.left(activity_id, 2) == 6, "in transit, not lost"
    loops_alive(sync_redis)
    url = f"/admin/v1/activities/{activity_id}/report"
    report = await (await client.get(url, headers=admin_headers(settings))).json()
    assert report["consistent"] is True, report["problems"]
    assert (report["available"], report["in_transit"]) == (6, 2)

    sweeper = Sweeper(services.stock)
    await sweeper.sweep()
    assert sweeper.stats.moves_finished == 0, "a fresh move belongs to its mover"
    _age(sync_redis, giver, "t1")
    await sweeper.sweep()
    assert sweeper.stats.moves_finished == 1
    assert _stock(sync_redis, activity_id, 2) == [5, 1]
    assert not sync_redis.hlen(keys.moves(giver))

    # finishing twice changes nothing: the receiving bucket knows the transfer id
    sync_redis.hset(keys.moves(giver), "t1", f"{taker} 2 1")
    await sweeper.sweep()
    assert _stock(sync_redis, activity_id, 2) == [5, 1] and not sync_redis.hlen(keys.moves(giver))
    report = await (await client.get(url, headers=admin_headers(settings))).json()
    assert report["consistent"] is True, report["problems"]
    assert (report["available"], report["in_transit"]) == (6, 0)


def _age(sync_redis: redis.Redis, space: str, transfer: str) -> None:
    """Make a journaled move look abandoned (older than buckets.ABANDONED_MS), as time would."""
    to, quantity, _ = sync_redis.hget(keys.moves(space), transfer).decode().split()
    old = int(time.time() * 1000) - buckets.ABANDONED_MS - 1000
    sync_redis.hset(keys.moves(space), transfer, f"{to} {quantity} {old}")


async def test_units_in_transit_are_never_answered_sold_out(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    activity_id = (await _create(client, settings, stock=4, buckets=2, per_user_limit=2))["id"]
    home, other = keys.bucket(activity_id, 0), keys.bucket(activity_id, 1)
    homed = (f"h{n}" for n in range(1000))
    first, second, third = [u for u in homed if buckets.home(activity_id, 2, u) == home][:3]

    async def buy(user: str, quantity: int) -> tuple[int, dict[str, Any]]:
        response = await client.post(
            f"/api/v1/activities/{activity_id}/orders",
            json={"quantity": quantity},
            headers=user_headers(settings, user, "k"),
        )
        return response.status, dict(await response.json())

    assert (await buy(first, 2))[0] == 202  # the home bucket is empty now
    # the other bucket's two units leave it and never arrive (their mover died)
    sync_redis.script_load(SCRIPTS.transfer_out.source)
    sync_redis.evalsha(SCRIPTS.transfer_out.sha, 3, *keys.transfer_out_keys(other), "t", home, 2)
    assert _stock(sync_redis, activity_id, 2) == [0, 0]
    status, body = await buy(second, 1)
    assert (status, body["error"]["code"]) == (503, "overloaded"), "in transit is not sold out"
    _age(sync_redis, other, "t")
    await Sweeper(client.server.app[SERVICES].stock).sweep()
    assert (await buy(second, 1))[0] == 202
    assert (await buy(third, 2))[1]["error"]["code"] == "sold_out", "one left, two asked"
    assert (await buy(third, 1))[0] == 202
    assert (await buy(f"{third}x", 1))[1]["error"]["code"] == "sold_out"


async def test_a_bucket_that_can_serve_costs_one_script_as_without_buckets(
    client: Client, settings: Settings, sync_redis: redis.Redis
) -> None:
    plain = (await _create(client, settings, stock=8))["id"]
    split = (await _create(client, settings, stock=8, buckets=4))["id"]
    for activity_id in (plain, split):
        await client.get(f"/api/v1/activities/{activity_id}")  # warm: the catalog holds it
        with redis_commands(sync_redis) as commands:
            response = await client.post(
                f"/api/v1/activities/{activity_id}/orders",
                json={"quantity": 1},
                headers=user_headers(settings, "ann", "k"),
            )
            assert response.status == 202
        tag = f"{{a:{activity_id}".encode()
        # what this purchase sent (the slow log lists the scripts' own commands too): the
        # scripts, and the moving step's journal removal and sum of the buckets
        sent = [c[0].upper() for c in commands if any(tag in arg for arg in c) and _client_sent(c)]
        assert sent == [b"EVALSHA"], (activity_id, sent)

    # an empty home bucket: the script, a survey of the four buckets, one move (its two
    # halves and the journal removal), the script again (the slow log keeps no order between a
    # script and the commands it ran)
    mate = next(
        u
        for u in (f"m{n}" for n in range(1000))
        if buckets.home(split, 4, u) == buckets.home(split, 4, "ann")
    )
    sync_redis.set(keys.stock(buckets.home(split, 4, "ann")), 0)
    sync_redis.hincrby(keys.counters(buckets.home(split, 4, "ann")), "initial_stock", -1)
    with redis_commands(sync_redis) as commands:
        response = await client.post(
            f"/api/v1/activities/{split}/orders",
            json={"quantity": 1},
            headers=user_headers(settings, mate, "k"),
        )
        assert response.status == 202
    tags = [f"{{a:{s}}}".encode() for s in buckets.spaces(split, 4)]
    sent = [
        c[0].upper()
        for c in commands
        if any(tag in arg for arg in c for tag in tags) and _client_sent(c)
    ]
    assert Counter(sent) == {b"EVALSHA": 4, b"HDEL": 1, b"HMGET": 4}, sent


def _client_sent(command: list[bytes]) -> bool:
    name = command[0].upper()
    if name == b"HMGET":  # the sum of the buckets, not the catalog's read (orders_created)
        return b"initial_stock" in command and b"orders_created" not in command
    return name == b"EVALSHA" or (name == b"HDEL" and command[1].endswith(b":moves"))
