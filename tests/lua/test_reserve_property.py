"""reserve_stock.lua against a Python model of what must happen, over random call sequences."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seckill import keys
from seckill.activities import Activity
from seckill.scripts import Scripts
from seckill.stock import fingerprint

SCRIPTS = Scripts.from_dir()
_ids = itertools.count()


@dataclass
class Model:
    stock: int
    limit: int
    window: str  # live, upcoming, ended
    holders: dict[str, int] = field(default_factory=dict)
    answers: dict[tuple[str, str], tuple[str, str, int]] = field(default_factory=dict)
    created: int = 0

    def reserve(self, user: str, key: str, quantity: int, gate: str, order_id: str) -> tuple:
        stored = self.answers.get((user, key))
        if stored is not None:
            if stored[0] != fingerprint(quantity):
                return ("reused",)
            return ("replay", stored[1], stored[2])
        if gate:
            return (gate,)
        if self.window == "upcoming":
            return ("not_started",)
        if self.window == "ended":
            return ("ended",)
        if self.holders.get(user, 0) + quantity > self.limit:
            return ("limit_reached",)
        if self.stock < quantity:
            return ("sold_out",)
        self.stock -= quantity
        self.holders[user] = self.holders.get(user, 0) + quantity
        self.answers[user, key] = (fingerprint(quantity), order_id, quantity)
        self.created += 1
        return ("ok", order_id, quantity)


def _create(client: redis.Redis, stock: int, limit: int, window: str) -> str:
    now = int(time.time() * 1000)
    starts, ends = {
        "live": (now - 60_000, now + 3_600_000),
        "upcoming": (now + 3_600_000, now + 7_200_000),
        "ended": (now - 7_200_000, now - 3_600_000),
    }[window]
    activity = Activity(f"prop{next(_ids)}", "sku", "t", 1, stock, limit, starts, ends, 60)
    client.evalsha(
        SCRIPTS.create_activity.sha,
        len(keys.activity_keys(activity.id)),
        *keys.activity_keys(activity.id),
        *activity.script_args(),
    )
    return activity.id


calls = st.lists(
    st.tuples(
        st.sampled_from(["alice", "bob", "carol", "dave"]),
        st.sampled_from(["k1", "k2", "k3"]),
        st.integers(min_value=1, max_value=4),
        st.sampled_from(["", "", "", "", "degraded"]),
    ),
    max_size=30,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stock=st.integers(min_value=0, max_value=8),
    limit=st.integers(min_value=1, max_value=4),
    window=st.sampled_from(["live", "live", "live", "upcoming", "ended"]),
    sequence=calls,
)
def test_script_matches_model(
    sync_redis: redis.Redis, stock: int, limit: int, window: str, sequence: list
) -> None:
    sync_redis.script_load(SCRIPTS.reserve_stock.source)
    sync_redis.script_load(SCRIPTS.create_activity.source)
    activity_id = _create(sync_redis, stock, limit, window)
    model = Model(stock, limit, window)
    for n, (user, key, quantity, gate) in enumerate(sequence):
        order_id = f"{activity_id}.{n:020x}"
        script_keys = keys.reserve_keys(activity_id, user, key)
        reply = sync_redis.evalsha(
            SCRIPTS.reserve_stock.sha,
            len(script_keys),
            *script_keys,
            user,
            quantity,
            fingerprint(quantity),
            order_id,
            86_400,
            gate,
            *(0, 0, 0, 0, "enforce", 0, 0),  # no rate limits here: see test_rate_limits.py
        )
        got = tuple(x.decode() if isinstance(x, bytes) else x for x in reply)
        expected = model.reserve(user, key, quantity, gate, order_id)
        if expected[0] in ("ok", "replay"):
            assert got[: len(expected)] == expected, (user, key, quantity, gate)
        else:
            assert got == expected, (user, key, quantity, gate)
        # after every step: the stock Redis holds is the model's, never negative
        assert int(sync_redis.get(keys.stock(activity_id))) == model.stock >= 0
    holders = {k.decode(): int(v) for k, v in sync_redis.hgetall(keys.holders(activity_id)).items()}
    assert holders == model.holders
    assert all(q <= limit for q in holders.values())
    assert sync_redis.xlen(keys.stream(activity_id)) == model.created
    assert model.stock + sum(model.holders.values()) == stock
