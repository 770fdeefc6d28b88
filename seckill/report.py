"""The invariant report of an activity: Redis and the store compared, drift named.

Every figure is measured, none derived from another, so a lost or duplicated order shows:
``orders_pending_write`` is what the writers' consumer group still holds (pending plus not yet
delivered), ``orders_in_store`` is a count in the database, ``orders_created`` is the counter
the reserve script bumps with each 202.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from redis.asyncio import Redis

from seckill import keys, skus
from seckill.activities import Activity
from seckill.orders.record import OrderRecord
from seckill.orders.store import OrderStore
from seckill.orders.streams import backlog

LIVE = ("reserved", "paid")


async def build(client: Redis, store: OrderStore, activity_id: str) -> dict[str, Any] | None:
    """The contract's report plus ``problems`` (what is wrong, in words); None if unknown."""
    meta: Any = await client.hgetall(keys.meta(activity_id))
    if not meta:
        return None
    activity = Activity.from_meta(meta)
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.counters(activity_id))
    pipe.get(keys.stock(activity_id))
    pipe.hgetall(keys.holders(activity_id))
    pipe.hgetall(keys.orders(activity_id))
    pipe.hgetall(keys.sku_stock(activity_id))
    raw_counters, raw_stock, raw_holders, raw_orders, raw_skus = await pipe.execute()
    counters = {k.decode(): int(v) for k, v in raw_counters.items()}
    available = int(raw_stock or 0)
    holders = {k.decode(): int(v) for k, v in raw_holders.items()}
    records = [OrderRecord.unpack(blob) for blob in raw_orders.values()]

    created_backlog = await backlog(client, keys.stream(activity_id))
    changes_backlog = await backlog(client, keys.changes(activity_id))
    in_store = await store.count(activity_id)

    initial = counters.get("initial_stock", activity.stock)
    reserved = counters.get("reserved", 0)
    paid = counters.get("paid", 0)
    created = counters.get("orders_created", 0)
    sku_figures, problems = skus.problems(activity, raw_skus, counters, available)

    if initial != available + reserved + paid:
        problems.append(
            f"stock: initial {initial} != available {available} + reserved {reserved} + paid {paid}"
        )
    if in_store + created_backlog.total != created:
        problems.append(
            f"orders: {in_store} stored + {created_backlog.total} pending write"
            f" != {created} created"
        )
    live_by_user: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    for record in records:
        by_status[record.status] += record.quantity
        if record.status in LIVE:
            live_by_user[record.user_id] += record.quantity
    over = skus.over_limit(activity, records, live_by_user)
    if over:
        problems.append(f"{len(over)} users over the per-user limit, e.g. {over[0]!r}")
    if dict(live_by_user) != holders:
        problems.append("holders disagree with the live orders")
    if by_status["reserved"] != reserved or by_status["paid"] != paid:
        problems.append("reserved/paid counters disagree with the order records")
    if len(records) != created:
        problems.append(f"{len(records)} order records in Redis != {created} created")
    if created_backlog.total == 0 and changes_backlog.total == 0:
        stored = await store.statuses(activity_id)
        differing = [r.order_id for r in records if stored.get(r.order_id) != r.status]
        if differing:
            problems.append(
                f"{len(differing)} orders differ between Redis and the store, e.g. {differing[0]}"
            )
        extra = set(stored) - {r.order_id for r in records}
        if extra:
            problems.append(f"{len(extra)} stored orders unknown to Redis")

    return {
        "activity_id": activity_id,
        "initial_stock": initial,
        "available": available,
        "reserved": reserved,
        "paid": paid,
        "released": counters.get("released", 0),
        "orders_created": created,
        "orders_in_store": in_store,
        "orders_pending_write": created_backlog.total,
        "changes_pending_write": changes_backlog.total,
        **({"skus": sku_figures} if activity.skus else {}),
        "consistent": not problems,
        "problems": problems,
    }
