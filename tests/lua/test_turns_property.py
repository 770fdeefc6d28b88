"""Turns (lua/turns.lua) against a Python model, over random purchases and cancels.

Invariants: a user buys only while admitted, once per turn, in the drawn order; admission
keeps exactly enough open claims to cover the stock on sale; returned stock admits the next
positions and nobody else.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seckill import keys, lottery
from seckill.activities import Activity
from seckill.scripts import Scripts
from seckill.stock import fingerprint

SCRIPTS = Scripts.from_dir()
SEED = "5e" * 32
_ids = itertools.count()


@dataclass
class Model:
    stock: int
    unit: int  # per_user_limit: one claim covers this many units
    order: list[str]  # position 1 first
    p: int = 0
    open: int = 0
    used: set[str] = field(default_factory=set)

    def advance(self) -> None:
        short = self.stock - self.open * self.unit
        if short > 0 and self.p < len(self.order):
            admitted = min(math.ceil(short / self.unit), len(self.order) - self.p)
            self.p += admitted
            self.open += admitted

    def reserve(self, user: str, quantity: int) -> str:
        if user not in self.order:
            return "not_registered"
        if user in self.used:
            return "not_your_turn"
        position = self.order.index(user) + 1
        if position > self.p:
            self.advance()
            if position > self.p:
                return "not_your_turn"
        if self.stock < quantity:
            return "sold_out"
        self.stock -= quantity
        self.open -= 1
        self.used.add(user)
        return "ok"

    def release(self, quantity: int) -> None:
        self.stock += quantity
        self.advance()


def _lottery(client: redis.Redis, stock: int, unit: int, users: list[str]) -> str:
    now = int(time.time() * 1000)
    activity = Activity(
        f"turns{next(_ids)}", "sku", "t", 1, stock, unit, now - 60_000, now + 3_600_000, 600,
        registration_opens_at_ms=now - 120_000, admission="lottery", claim_window_s=3600,
    )  # fmt: skip
    activity_keys = keys.activity_keys(activity.id)
    args = activity.script_args(SEED, lottery.commitment(SEED))
    client.evalsha(SCRIPTS.create_activity.sha, len(activity_keys), *activity_keys, *args)
    # registered as register.lua would have, before the start
    for seq, user in enumerate(users, start=1):
        client.rpush(keys.registration_order(activity.id), user)
        client.hset(keys.registrants(activity.id), user, f"{seq}||{now - 90_000}")
    ordered = lottery.order(SEED, users)
    staging = keys.draw_staging(activity.id, "t")
    if ordered:
        client.hset(staging, mapping={u: i for i, u in enumerate(ordered, start=1)})
    install_keys = keys.install_draw_keys(activity.id, "t")
    reply = client.evalsha(
        SCRIPTS.install_draw.sha,
        len(install_keys),
        *install_keys,
        len(ordered),
        lottery.digest(ordered),
    )
    assert reply[0] == b"installed"
    return activity.id


operations = st.lists(
    st.one_of(
        st.tuples(st.just("buy"), st.integers(0, 8), st.integers(1, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 20), st.just(0)),
    ),
    max_size=40,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stock=st.integers(min_value=0, max_value=7),
    unit=st.integers(min_value=1, max_value=3),
    registrants=st.integers(min_value=0, max_value=8),
    sequence=operations,
)
def test_turns_match_the_model(
    sync_redis: redis.Redis, stock: int, unit: int, registrants: int, sequence: list
) -> None:
    for script in SCRIPTS.all():
        sync_redis.script_load(script.source)
    users = [f"u{i}" for i in range(registrants)]
    activity_id = _lottery(sync_redis, stock, unit, users)
    model = Model(stock, unit, lottery.order(SEED, users))
    model.advance()  # the install admits the first batch
    live: list[tuple[str, int]] = []  # (order id, quantity) still reserved
    people = [*users, "stranger"]
    for n, (kind, who, quantity) in enumerate(sequence):
        if kind == "buy":
            user = people[who % len(people)]
            quantity = min(quantity, unit)
            order_id = f"{activity_id}.{n:020x}"
            script_keys = keys.reserve_keys(activity_id, user, f"k{n}", fair=True)
            reply = sync_redis.evalsha(
                SCRIPTS.reserve_stock.sha,
                len(script_keys),
                *script_keys,
                user,
                quantity,
                fingerprint(quantity),
                order_id,
                86_400,
                "",
                *(0, 0, 0, 0, "enforce", 0, 0),
            )
            expected = model.reserve(user, quantity)
            assert reply[0].decode() == expected, (user, quantity, model)
            if expected == "ok":
                live.append((order_id, quantity))
        elif live:
            order_id, released = live.pop(who % len(live))
            release_keys = keys.release_keys(activity_id)
            reply = sync_redis.evalsha(
                SCRIPTS.release_stock.sha,
                len(release_keys),
                *release_keys,
                order_id,
                "cancelled",
                "",
            )
            assert reply[0] == b"released"
            model.release(released)
        turns = {k.decode(): int(v) for k, v in sync_redis.hgetall(keys.turns(activity_id)).items()}
        assert (turns["p"], turns["open"]) == (model.p, model.open), (kind, model)
        assert int(sync_redis.get(keys.stock(activity_id))) == model.stock >= 0
        # every buyer's turn had come: nobody beyond position p ever bought
        buyers = {b.decode() for b in sync_redis.hkeys(keys.claims(activity_id))}
        assert buyers == model.used
        assert all(model.order.index(u) < model.p for u in buyers)
