"""Stateful: buy / replay / pay / cancel / expire in any order, checked after every step.

Invariant after every step, in Redis and in the store (through the writer):
initial = available + reserved + paid, no user over the limit, and the store agrees with Redis
on every order's status (the contract's report says ``consistent``). Ended orders leave Redis
(a Retirer pass with no grace after every step), so every rule also meets orders that only the
store still holds.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from seckill import keys, report
from seckill.activities import Activity
from seckill.orders.retirement import Retirer
from seckill.orders.store import open_store
from seckill.orders.sweeper import Sweeper
from seckill.orders.writer import Writer, WriterConfig
from seckill.scripts import Coalescer, Scripts
from seckill.stock import Outcome, Payment, Release, Stock

PRICE, STOCK, LIMIT = 100, 6, 2
USERS = ["ann", "bob", "cat"]
_ids = itertools.count()


@dataclass
class ModelOrder:
    order_id: str
    user: str
    quantity: int
    status: str = "reserved"


def machine(redis_url: str, database_url: str) -> type[RuleBasedStateMachine]:
    class Lifecycle(RuleBasedStateMachine):
        orders = Bundle("orders")

        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.client = Redis.from_url(redis_url)
            self.store = open_store(database_url)
            self.stock = Stock(
                self.client,
                Scripts.from_dir(),
                Coalescer(self.client, max_batch=8, in_flight=1),
                90_000,
            )
            self.writer = Writer(self.client, self.store, WriterConfig(block_ms=1), "stateful")
            self.retirer = Retirer(self.client, self.store, grace_s=0)
            self.activity_id = f"st{next(_ids)}-{int(time.time())}"
            self.available = STOCK
            self.model: dict[str, ModelOrder] = {}
            self.answers: dict[tuple[str, str], tuple[str, int]] = {}
            self.events: dict[str, str] = {}

        def run(self, coro: Any) -> Any:
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            self.run(self.store.close())
            self.run(self.client.aclose())
            self.loop.close()

        @initialize()
        def define(self) -> None:
            now = int(time.time() * 1000)
            activity = Activity(
                self.activity_id, "sku", "t", PRICE, STOCK, LIMIT, now - 1000, now + 3_600_000, 900
            )
            self.run(self.stock.put_activity(activity))
            for loop in ("writer", "sweeper"):  # the loops run here by hand: say they are alive
                self.run(self.client.set(keys.heartbeat(loop), "stateful", ex=600))

        def held(self, user: str) -> int:
            return sum(
                o.quantity
                for o in self.model.values()
                if o.user == user and o.status in ("reserved", "paid")
            )

        @rule(
            target=orders,
            user=st.sampled_from(USERS),
            key=st.sampled_from(["k1", "k2", "k3"]),
            quantity=st.integers(1, LIMIT),
        )
        def buy(self, user: str, key: str, quantity: int) -> str:
            got = self.run(self.stock.reserve(self.activity_id, user, key, quantity))
            stored = self.answers.get((user, key))
            if stored is not None:
                if stored[1] != quantity:
                    assert got.outcome is Outcome.REUSED
                else:
                    assert got.outcome is Outcome.REPLAY and got.order_id == stored[0]
                return stored[0]
            if self.held(user) + quantity > LIMIT:
                assert got.outcome is Outcome.LIMIT_REACHED
                return ""
            if self.available < quantity:
                assert got.outcome is Outcome.SOLD_OUT
                return ""
            assert got.outcome is Outcome.OK
            self.available -= quantity
            self.model[got.order_id] = ModelOrder(got.order_id, user, quantity)
            self.answers[user, key] = (got.order_id, quantity)
            return got.order_id

        @rule(order_id=orders, event=st.sampled_from(["e1", "e2"]), exact=st.booleans())
        def pay(self, order_id: str, event: str, exact: bool) -> None:
            if not order_id:
                return
            order = self.model[order_id]
            amount = PRICE * order.quantity if exact else PRICE * order.quantity + 1
            event_id = f"{order_id.split('.')[1]}-{event}"
            got = self.run(
                self.stock.pay(order_id, event_id, amount, True, retired=self.store.order)
            )
            if event_id in self.events:
                if exact:
                    assert got.value == self.events[event_id], "a replayed event answers the same"
                else:
                    assert got is Payment.CONFLICT, "an event id is bound to its payload"
                return
            if not exact:
                assert got is Payment.AMOUNT_MISMATCH
                return
            expected = Payment.PAID if order.status == "reserved" else Payment.REFUND_REQUIRED
            assert got is expected
            self.events[event_id] = got.value
            if got is Payment.PAID:
                order.status = "paid"

        @rule(order_id=orders, by_owner=st.booleans())
        def cancel(self, order_id: str, by_owner: bool) -> None:
            if not order_id:
                return
            order = self.model[order_id]
            owner = order.user if by_owner else "mallory"
            got = self.run(self.stock.release(order_id, "cancelled", owner=owner))
            retired = self.run(self.client.hget(keys.orders(self.activity_id), order_id)) is None
            if not by_owner or retired:
                assert got is Release.NOT_FOUND
            elif order.status != "reserved":
                assert got is Release.NOT_CANCELLABLE
            else:
                assert got is Release.RELEASED
                order.status = "cancelled"
                self.available += order.quantity

        @rule(order_id=orders)
        def expire(self, order_id: str) -> None:
            if not order_id:
                return
            order = self.model[order_id]
            if order.status == "reserved":
                # time passes for this one order: its deadline moves into the past
                orders_key = keys.orders(self.activity_id)
                record = msgpack.unpackb(self.run(self.client.hget(orders_key, order_id)))
                record["expires_at"] = int(time.time() * 1000) - 1
                self.run(self.client.hset(orders_key, order_id, msgpack.packb(record)))
                self.run(self.client.zadd(keys.deadlines(self.activity_id), {order_id: 1}))
                order.status = "expired"
                self.available += order.quantity
            self.run(Sweeper(self.stock).sweep())

        @invariant()
        def redis_and_store_agree(self) -> None:
            self.run(self.writer.drain(idle_rounds=1))
            self.run(self.retirer.retire_once())
            body = self.run(report.build(self.client, self.store, self.activity_id))
            if body is None:
                return  # before @initialize
            assert body["consistent"], body["problems"]
            assert body["available"] == self.available
            assert body["initial_stock"] == body["available"] + body["reserved"] + body["paid"]
            assert body["orders_pending_write"] == 0
            statuses = self.run(self.store.statuses(self.activity_id))
            assert statuses == {o.order_id: o.status for o in self.model.values()}
            for user in USERS:
                assert self.held(user) <= LIMIT
            in_redis = self.run(self.client.hkeys(keys.orders(self.activity_id)))
            assert {k.decode() for k in in_redis} == {
                o.order_id for o in self.model.values() if o.status == "reserved"
            }, "every ended order left Redis once stored; every reserved one stayed"

    return Lifecycle


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_lifecycle_state_machine(
    kind: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        database_url = f"sqlite:///{tmp_path / 'orders.db'}"
    else:
        database_url = request.getfixturevalue("postgres_url")
    run_state_machine_as_test(
        machine(redis_url, database_url),
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
