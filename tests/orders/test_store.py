"""The order store, the same tests on SQLite and PostgreSQL: idempotent, legal moves only."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from seckill.orders.record import OrderRecord
from seckill.orders.store import Batch, OrderStore, PaymentEvent, Transition


def _order(n: int, status: str = "reserved", activity: str = "act") -> OrderRecord:
    return OrderRecord(
        order_id=f"{activity}.{n:020x}",
        activity_id=activity,
        user_id=f"user{n}",
        quantity=1 + n % 3,
        status=status,
        created_at_ms=1_000 + n,
        expires_at_ms=901_000 + n,
        paid_at_ms=0,
    )


def _move(order: OrderRecord, to: str, at: int = 5_000) -> Transition:
    after = replace(order, status=to, paid_at_ms=at if to == "paid" else 0)
    return Transition(order=after, from_state="reserved", to_state=to, at_ms=at)


async def test_a_batch_written_twice_is_stored_once(store: OrderStore) -> None:
    orders = [_order(n) for n in range(50)]
    first = await store.write(Batch(created=orders))
    again = await store.write(Batch(created=orders))
    assert first.inserted == 50 and again.inserted == 0
    assert await store.count("act") == 50
    assert set((await store.statuses("act")).values()) == {"reserved"}
    assert await store.order(orders[7].order_id) == orders[7]
    assert await store.order("act.nope") is None


async def test_legal_transitions_apply_once_with_their_history(store: OrderStore) -> None:
    paid, cancelled, expired = _order(1), _order(2), _order(3)
    await store.write(Batch(created=[paid, cancelled, expired]))
    moves = [_move(paid, "paid"), _move(cancelled, "cancelled"), _move(expired, "expired")]
    result = await store.write(Batch(transitions=moves))
    assert result.applied == 3 and not result.illegal
    replay = await store.write(Batch(transitions=moves))
    assert replay.applied == 0 and not replay.illegal, "a redelivered change is a no-op"
    assert await store.statuses("act") == {
        paid.order_id: "paid",
        cancelled.order_id: "cancelled",
        expired.order_id: "expired",
    }
    stored = await store.order(paid.order_id)
    assert stored is not None and stored.paid_at_ms == 5_000
    history = await store.history(paid.order_id)
    assert [(h[0], h[1], h[2]) for h in history] == [
        ("new", "reserved", "purchase"),
        ("reserved", "paid", "payment"),
    ]


async def test_illegal_transitions_are_refused_and_reported(store: OrderStore) -> None:
    order = _order(1)
    await store.write(Batch(created=[order], transitions=[_move(order, "cancelled")]))
    result = await store.write(Batch(transitions=[_move(order, "paid")]))
    assert [t.to_state for t in result.illegal] == ["paid"]
    assert await store.statuses("act") == {order.order_id: "cancelled"}
    assert [h[1] for h in await store.history(order.order_id)] == ["reserved", "cancelled"]


async def test_a_change_arriving_before_its_creation_still_lands(store: OrderStore) -> None:
    order = _order(1)
    result = await store.write(Batch(transitions=[_move(order, "paid")]))
    assert not result.illegal and result.inserted == 1
    late = await store.write(Batch(created=[order]))
    assert late.inserted == 0, "the creation arriving afterwards changes nothing"
    assert await store.statuses("act") == {order.order_id: "paid"}
    assert await store.count("act") == 1


async def test_payment_events_are_recorded_once(store: OrderStore) -> None:
    order = _order(1)
    events = [
        PaymentEvent("ev1", order.order_id, 100, "paid", 10),
        PaymentEvent("ev2", order.order_id, 100, "refund_required", 20),
    ]
    await store.write(Batch(created=[order], payments=events))
    await store.write(Batch(payments=events))
    assert await store.payments(order.order_id) == [("ev1", "paid"), ("ev2", "refund_required")]


async def test_migrate_is_idempotent(store: OrderStore) -> None:
    await store.migrate()
    await store.migrate()
    await store.write(Batch(created=[_order(1)]))
    assert await store.count("act") == 1


async def test_schema_2_keeps_orders_stored_before_it(tmp_path: Any) -> None:
    """Invariant: upgrading a version-1 database keeps every row, with the defaults of
    an order from before SKUs (no SKU, the activity's price, no tier, no address)."""
    import sqlite3

    from seckill.orders import store as sql
    from seckill.orders.sqlite import SqliteStore

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    for statement in sql.SCHEMA[0]:
        db.execute(statement)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version (version) VALUES (1)")
    db.execute(
        "INSERT INTO orders (order_id, activity_id, user_id, quantity, status, created_at_ms,"
        " expires_at_ms, paid_at_ms) VALUES ('act.00000000000000000001', 'act', 'u', 1,"
        " 'reserved', 1, 2, 0)"
    )
    db.commit()
    db.close()
    upgraded = SqliteStore(str(path))
    try:
        await upgraded.migrate()
        old = await upgraded.order("act.00000000000000000001")
        assert old == OrderRecord("act.00000000000000000001", "act", "u", 1, "reserved", 1, 2, 0)
        assert old is not None and (old.sku_id, old.price_cents, old.address) == ("", -1, "")
        fresh = replace(_order(5), sku_id="s", price_cents=700, tier="gold", address="x:y:z")
        await upgraded.write(Batch(created=[fresh]))
        assert await upgraded.order(fresh.order_id) == fresh
    finally:
        await upgraded.close()
