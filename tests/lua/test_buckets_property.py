"""Buckets against a Python model of one Redis: random buys, replays, cancels, expiries and
stock moves cut short, over random bucket counts.

The model is the single-bucket sale: whatever the buckets do between them, a buyer gets what
one Redis would have answered (sold_out only when fewer units than asked are left anywhere),
except while the units needed are in transit from a move cut short (then "moving": retry), and
after every step the buckets together hold exactly the model's stock and holdings.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from seckill import buckets, keys
from seckill.activities import Activity
from seckill.errors import Overloaded
from seckill.purchase import from_other_buckets
from seckill.scripts import Coalescer, Scripts
from seckill.stock import Outcome, Release, Stock, fingerprint

SCRIPTS = Scripts.from_dir()
USERS = ["ann", "bob", "cat", "dan", "eve"]
_ids = itertools.count()


@dataclass
class Model:
    stock: int
    limit: int
    holders: dict[str, int] = field(default_factory=dict)
    answers: dict[tuple[str, str], tuple[str, str, int]] = field(default_factory=dict)
    live: dict[str, tuple[str, int]] = field(default_factory=dict)  # order id -> user, quantity
    stranded: int = 0  # units of moves cut short, not finished yet

    def buy(self, user: str, key: str, quantity: int) -> tuple[str, ...]:
        stored = self.answers.get((user, key))
        if stored is not None:
            if stored[0] != fingerprint(quantity):
                return ("reused",)
            return ("replay", stored[1])
        if self.holders.get(user, 0) + quantity > self.limit:
            return ("limit_reached",)
        if self.stock < quantity:
            return ("sold_out",)
        if self.stock - self.stranded < quantity:
            return ("moving",)
        return ("ok",)

    def bought(self, user: str, key: str, quantity: int, order_id: str) -> None:
        self.stock -= quantity
        self.holders[user] = self.holders.get(user, 0) + quantity
        self.answers[user, key] = (fingerprint(quantity), order_id, quantity)
        self.live[order_id] = (user, quantity)

    def release(self, order_id: str) -> None:
        user, quantity = self.live.pop(order_id)
        self.stock += quantity
        self.holders[user] -= quantity
        if not self.holders[user]:
            del self.holders[user]


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("buy"),
            st.sampled_from(USERS),
            st.sampled_from(["k1", "k2", "k3"]),
            st.integers(1, 3),
        ),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("expire"), st.integers(0, 20)),
        st.tuples(st.just("cut"), st.integers(0, 3), st.integers(0, 3), st.integers(1, 3)),
        st.tuples(st.just("recover")),
    ),
    max_size=25,
)


class Sale:
    """One activity's buckets driven through Stock and the purchase's moving step."""

    def __init__(self, client: Redis, activity: Activity) -> None:
        self.client = client
        self.activity = activity
        self.stock = Stock(client, SCRIPTS, Coalescer(client, max_batch=8, in_flight=1), 90_000)
        self.cuts = itertools.count()

    async def buy(self, user: str, key: str, quantity: int) -> tuple[str, ...]:
        activity = self.activity
        space = buckets.home(activity.id, activity.buckets, user)

        def attempt(again: bool = False) -> Any:
            return self.stock.reserve(space, user, key, quantity)

        got = await attempt()
        if got.outcome is Outcome.SOLD_OUT and activity.buckets > 1:
            try:
                got = await from_other_buckets(
                    self.stock.buckets, activity, space, quantity, attempt
                )
            except Overloaded:
                return ("moving",)
        if got.outcome in (Outcome.OK, Outcome.REPLAY):
            assert keys.space_of_order(got.order_id) == space, "the order lives at home"
            return (got.outcome.value, got.order_id)
        return (got.outcome.value,)

    async def expire(self, order_id: str) -> Release:
        """Move the order's deadline into the past (as time would), then expire it."""
        space = keys.space_of_order(order_id)
        assert space is not None
        record = msgpack.unpackb(await self.client.hget(keys.orders(space), order_id), raw=False)
        record["expires_at"] = int(time.time() * 1000) - 1
        await self.client.hset(keys.orders(space), order_id, msgpack.packb(record))
        return await self.stock.release(order_id, "expired")

    async def cut(self, giver: int, taker: int, quantity: int) -> int:
        """The giving half of a move only, as if its mover died; the units it took."""
        count = self.activity.buckets
        giving = keys.bucket(self.activity.id, giver % count)
        taking = keys.bucket(self.activity.id, taker % count)
        reply = await SCRIPTS.transfer_out(
            self.client,
            keys.transfer_out_keys(giving),
            [f"cut{next(self.cuts)}", taking, quantity],
        )
        return int(reply[0])

    async def recover(self) -> None:
        """The sweeper's step, at a moment when every journaled move looks abandoned."""
        later = int(time.time() * 1000) + buckets.ABANDONED_MS + 1000
        for space in buckets.spaces(self.activity.id, self.activity.buckets):
            await self.stock.buckets.recover(space, later)

    async def totals(self) -> tuple[int, dict[str, int], int]:
        """(units on sale or in transit, holdings by user, units reserved) over all buckets."""
        on_sale = reserved = 0
        holders: dict[str, int] = {}
        for space in buckets.spaces(self.activity.id, self.activity.buckets):
            on_sale += int(await self.client.get(keys.stock(space)) or 0)
            for entry in (await self.client.hgetall(keys.moves(space))).values():
                on_sale += int(entry.split()[1])
            for user, held in (await self.client.hgetall(keys.holders(space))).items():
                holders[user.decode()] = holders.get(user.decode(), 0) + int(held)
            reserved += int(await self.client.hget(keys.counters(space), "reserved") or 0)
        return on_sale, holders, reserved


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    count=st.integers(1, 4),
    extra=st.integers(0, 8),
    limit=st.integers(1, 3),
    sequence=steps,
)
def test_buckets_match_one_redis(
    redis_url: str, count: int, extra: int, limit: int, sequence: list[Any]
) -> None:
    asyncio.run(_run(redis_url, count, count + extra, limit, sequence))


async def _run(redis_url: str, count: int, stock: int, limit: int, sequence: list[Any]) -> None:
    now = int(time.time() * 1000)
    activity = Activity(
        f"bp{next(_ids)}",
        "sku",
        "t",
        1,
        stock,
        limit,
        now - 60_000,
        now + 3_600_000,
        900,
        buckets=count,
    )
    client = Redis.from_url(redis_url)
    try:
        sale = Sale(client, activity)
        await sale.stock.put_activity(activity)
        model = Model(stock, limit)
        created: dict[str, str] = {}  # order id -> its owner
        for step in sequence:
            await _step(sale, model, created, step)
            on_sale, holders, reserved = await sale.totals()
            assert on_sale == model.stock >= 0, step
            assert holders == model.holders, step
            assert reserved == sum(q for _, q in model.live.values()), step
            assert await sale.stock.buckets.left(activity.id, count) == model.stock, step
    finally:
        await client.aclose()


async def _step(sale: Sale, model: Model, created: dict[str, str], step: tuple[Any, ...]) -> None:
    kind = step[0]
    if kind == "buy":
        _, user, key, quantity = step
        expected = model.buy(user, key, quantity)
        got = await sale.buy(user, key, quantity)
        assert got[: len(expected)] == expected, (step, got)
        if got[0] == "ok":
            model.bought(user, key, quantity, got[1])
            created[got[1]] = user
    elif kind in ("cancel", "expire") and created:
        order_id = list(created)[step[1] % len(created)]
        if kind == "cancel":
            outcome = await sale.stock.release(order_id, "cancelled", owner=created[order_id])
        else:
            outcome = await sale.expire(order_id) if order_id in model.live else None
        if order_id in model.live:
            assert outcome is Release.RELEASED, step
            model.release(order_id)
        elif outcome is not None:
            assert outcome is Release.NOT_CANCELLABLE, step
    elif kind == "cut" and sale.activity.buckets > 1:  # one bucket never moves stock
        model.stranded += await sale.cut(*step[1:])
    elif kind == "recover":
        await sale.recover()
        model.stranded = 0
