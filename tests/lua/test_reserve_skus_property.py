"""reserve_stock.lua with SKUs and tier terms against a Python model, over random call sequences.

Invariants: no SKU ever below zero or oversold, the total equals the sum of the SKUs, a user's
holding across SKUs never exceeds the limit the call carried, the recorded price is the one
passed, and a refusal writes nothing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import msgpack
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seckill import keys
from seckill.activities import Activity, Sku
from seckill.scripts import Scripts
from seckill.stock import fingerprint

SCRIPTS = Scripts.from_dir()
SKU_IDS = ("a", "b", "c")
_ids = itertools.count()


@dataclass
class Model:
    stock: dict[str, int]
    holders: dict[str, int] = field(default_factory=dict)
    answers: dict[tuple[str, str], tuple[str, str, int]] = field(default_factory=dict)

    def reserve(
        self, user: str, key: str, quantity: int, sku: str, limit: int, order_id: str
    ) -> tuple[object, ...]:
        body = fingerprint(quantity, sku)
        stored = self.answers.get((user, key))
        if stored is not None:
            return ("reused",) if stored[0] != body else ("replay", stored[1], stored[2])
        if self.holders.get(user, 0) + quantity > limit:
            return ("limit_reached",)
        if sku not in self.stock:
            if sum(self.stock.values()) < quantity:
                return ("sold_out",)
            return ("unknown_sku",)
        if self.stock[sku] < quantity:
            return ("sold_out",)
        self.stock[sku] -= quantity
        self.holders[user] = self.holders.get(user, 0) + quantity
        self.answers[user, key] = (body, order_id, quantity)
        return ("ok", order_id, quantity)


def _create(client: redis.Redis, stocks: dict[str, int]) -> Activity:
    now = int(time.time() * 1000)
    skus = tuple(Sku(s, s.upper(), 100 * (n + 1), q) for n, (s, q) in enumerate(stocks.items()))
    activity = Activity(
        f"skuprop{next(_ids)}",
        skus[0].sku_id,
        "t",
        100,
        sum(stocks.values()),
        1,
        now - 60_000,
        now + 3_600_000,
        60,
        skus=skus,
    )
    script_keys = keys.activity_keys(activity.id)
    client.evalsha(
        SCRIPTS.create_activity.sha, len(script_keys), *script_keys, *activity.script_args()
    )
    return activity


calls = st.lists(
    st.tuples(
        st.sampled_from(["alice", "bob", "carol"]),
        st.sampled_from(["k1", "k2", "k3"]),
        st.integers(min_value=1, max_value=3),
        st.sampled_from([*SKU_IDS, "zz"]),
        st.sampled_from([1, 2, 5]),  # the caller's tier limit
        st.sampled_from([100, 70]),  # the caller's unit price
    ),
    max_size=30,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stocks=st.fixed_dictionaries({s: st.integers(min_value=0, max_value=4) for s in SKU_IDS}),
    sequence=calls,
)
def test_skus_and_terms_match_the_model(
    sync_redis: redis.Redis, stocks: dict[str, int], sequence: list
) -> None:
    sync_redis.script_load(SCRIPTS.reserve_stock.source)
    sync_redis.script_load(SCRIPTS.create_activity.source)
    activity = _create(sync_redis, stocks)
    model = Model(dict(stocks))
    prices: dict[str, int] = {}
    for n, (user, key, quantity, sku, limit, price) in enumerate(sequence):
        order_id = f"{activity.id}.{n:020x}"
        script_keys = keys.reserve_keys(activity.id, user, key)
        before = sync_redis.xlen(keys.stream(activity.id))
        reply = sync_redis.evalsha(
            SCRIPTS.reserve_stock.sha,
            len(script_keys),
            *script_keys,
            user,
            quantity,
            fingerprint(quantity, sku),
            order_id,
            86_400,
            "",
            *(0, 0, 0, 0, "enforce", 0, 0),
            sku,
            activity.starts_at_ms,
            limit,
            price,
            "",
            activity.version,
            "",
            "",
        )
        got = tuple(x.decode() if isinstance(x, bytes) else x for x in reply)
        expected = model.reserve(user, key, quantity, sku, limit, order_id)
        if expected[0] == "ok":
            assert got[:3] == expected, (user, key, quantity, sku)
            assert got[5] == model.stock[sku], "the reply carries the SKU's stock left"
            prices[order_id] = price
        elif expected[0] == "replay":
            assert got[:3] == expected
        else:
            assert got == expected, (user, key, quantity, sku, limit)
            assert sync_redis.xlen(keys.stream(activity.id)) == before, "a refusal writes nothing"
        left = {
            k.decode(): int(v) for k, v in sync_redis.hgetall(keys.sku_stock(activity.id)).items()
        }
        assert left == model.stock and min(left.values()) >= 0
        assert int(sync_redis.get(keys.stock(activity.id))) == sum(left.values())

    for _, fields in sync_redis.xrange(keys.stream(activity.id)):
        record = msgpack.unpackb(fields[b"o"], raw=False)
        assert record["price_cents"] == prices[record["order_id"]]
        assert record["sku_id"] in SKU_IDS
    holders = {k.decode(): int(v) for k, v in sync_redis.hgetall(keys.holders(activity.id)).items()}
    assert holders == model.holders
    counters = sync_redis.hgetall(keys.counters(activity.id))
    for sku, initial in stocks.items():
        held = int(counters[f"held:{sku}".encode()])
        assert held + model.stock[sku] == initial, "per SKU: initial = on sale + held"
