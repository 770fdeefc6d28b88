"""The invariant report of an activity: Redis and the store compared, drift named.

Every figure is measured, none derived from another, so a lost or duplicated order shows.

How a reading stays true under live traffic:

1. Redis is read in one atomic step (report_snapshot.lua): counters, stock, holders, the order
   records still in Redis, both streams' backlogs (O(1): the group's lag), the order ids of the
   entries the writers hold pending, and the dead-letter count, at one instant A.
2. The store is read in one statement.
3. The writers' group positions are read again (B). If no writer read a new order entry between
   A and B, an order undelivered at A can be in the store only through its change (a change
   carries the whole record), and such an order was created after the last delivered entry;
   a pending entry whose order is already stored (a committed batch whose XACK was lost) is
   known by id. Both are counted once. If a writer moved, the reading is taken again.

Ended orders leave Redis once the store holds them (the Retirer), so per-order checks run on
the records Redis still holds plus the stored orders that left it before A; past DEEP_LIMIT
records in Redis they are skipped (``orders_checked`` false) so a report never blocks Redis.
Statuses are compared only when every change was delivered and none moved during the reading.

A bucketed activity (seckill/buckets.py) is read bucket by bucket, each bucket in one atomic
step, and the readings added up: a bucket's books balance on their own (initial + moved_in -
moved_out == stock + reserved + paid), so the sum holds whenever units move between buckets,
and ``available`` counts the units in transit. Orders are checked against their own bucket's
instant. One limit: a count-only reading (no order records) takes the latest bucket's last
delivery for "created after the writers' last delivery".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from seckill import buckets, keys, skus
from seckill.activities import Activity
from seckill.connections import Client
from seckill.orders.record import OrderRecord
from seckill.orders.store import OrderStore
from seckill.orders.streams import GROUP
from seckill.scripts import Scripts

LIVE = ("reserved", "paid")
TERMINAL = ("paid", "cancelled", "expired")
# pending entries are bounded by writers x batch size; this many order ids are read at most
PENDING_CAP = 50_000
# after an AOF replay or a promotion the group cannot count its lag: count this many at most
TAIL_CAP = 1_000
ATTEMPTS = 40
# once the counts hold, this many more tries for a moment when the changes stand still too
FALLBACK_ATTEMPTS = 1
# past this many order records in Redis the per-order checks are skipped: reading them all
# would block Redis (and move megabytes) in the middle of a big sale
DEEP_LIMIT = 100_000


@functools.cache
def _scripts() -> Scripts:
    return Scripts.from_dir()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms or 0), int(seq or 0)


@dataclass(slots=True)
class StreamState:
    """One stream's backlog for the writers' group, at the snapshot's instant."""

    position: str
    pending: int
    undelivered: int  # -1: not countable right now (see lower_bound)
    lower_bound: int
    max_deleted_id: str
    last_delivered_id: str
    pending_entries: list[tuple[str, str]] = field(default_factory=list)  # (entry id, order id)
    truncated: bool = False
    parts: list[StreamState] = field(default_factory=list)  # a bucketed activity's streams

    @classmethod
    def merge(cls, parts: list[StreamState]) -> StreamState:
        """The backlog of several buckets' streams, as one."""
        countable = all(p.undelivered >= 0 for p in parts)
        return cls(
            position="|".join(p.position for p in parts),
            pending=sum(p.pending for p in parts),
            undelivered=sum(p.undelivered for p in parts) if countable else -1,
            lower_bound=sum(p.lower_bound for p in parts),
            max_deleted_id="",
            last_delivered_id="",
            pending_entries=[e for p in parts for e in p.pending_entries],
            truncated=any(p.truncated for p in parts),
            parts=parts,
        )

    @classmethod
    def parse(cls, raw: Any) -> StreamState:
        return cls(
            position=_text(raw[0]),
            pending=int(raw[1]),
            undelivered=int(raw[2]),
            lower_bound=int(raw[3]),
            max_deleted_id=_text(raw[4]),
            last_delivered_id=_text(raw[5]),
            pending_entries=[(_text(e[0]), _text(e[1])) for e in raw[6]],
            truncated=bool(int(raw[7])),
        )

    @property
    def total(self) -> int:
        return self.pending + max(self.undelivered, self.lower_bound)

    def deleted_unread(self) -> bool:
        """An entry was deleted after the writers' last delivery: it can never be written."""
        if self.parts:
            return any(p.deleted_unread() for p in self.parts)
        if not self.position:  # no group: the stream's length already leaves it out
            return False
        return _entry_id(self.max_deleted_id) > _entry_id(self.last_delivered_id)

    def delivered_ms(self) -> int:
        """Orders created after this millisecond (Redis time) had not been delivered."""
        if self.parts:  # only a count-only reading asks this of several buckets (see above)
            return max(p.delivered_ms() for p in self.parts)
        ms = _entry_id(self.last_delivered_id)[0]
        # no group: every entry in the stream is undelivered, from the first one on
        return ms if self.position else max(ms - 1, 0)


@dataclass(slots=True)
class Snapshot:
    now_ms: int
    counters: dict[str, int]
    available: int
    holders: dict[str, int]
    records: dict[str, OrderRecord]
    created: StreamState
    changes: StreamState
    dead_letters: int
    record_count: int
    sku_stock: dict[bytes, bytes] = field(default_factory=dict)  # SKU id -> quantity on sale
    # False: a shallow reading (the console's): counts only, whatever the records number
    deep_allowed: bool = True
    # a bucketed activity's readings by key space (empty: one key space, this reading)
    parts: dict[str, Snapshot] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: dict[str, Snapshot]) -> Snapshot:
        """The readings of every bucket, added up; ``available`` with units in transit."""
        counters: Counter[str] = Counter()
        holders: Counter[str] = Counter()
        records: dict[str, OrderRecord] = {}
        for part in parts.values():
            counters.update(part.counters)
            holders.update(part.holders)
            records.update(part.records)
        readings = list(parts.values())
        return cls(
            now_ms=max(p.now_ms for p in readings),
            counters=dict(counters),
            available=sum(p.available for p in readings)
            + counters["moved_out"]
            - counters["moved_in"],
            holders=dict(holders),
            records=records,
            created=StreamState.merge([p.created for p in readings]),
            changes=StreamState.merge([p.changes for p in readings]),
            dead_letters=sum(p.dead_letters for p in readings),
            record_count=sum(p.record_count for p in readings),
            deep_allowed=all(p.deep_allowed for p in readings),
            parts=parts,
        )

    def _part(self, order_id: str) -> Snapshot:
        if not self.parts:
            return self
        return self.parts.get(keys.space_of_order(order_id) or "", self)

    def taken_ms(self, order_id: str) -> int:
        """The Redis time of the reading that holds the order's bucket."""
        return self._part(order_id).now_ms

    def delivered_ms_of(self, order_id: str) -> int:
        """Orders of this one's bucket created after this ms had not been delivered."""
        return self._part(order_id).created.delivered_ms()

    @property
    def deep(self) -> bool:
        """True when the order records (and holders) were read, for the per-order checks."""
        return self.deep_allowed and len(self.records) == self.record_count

    @classmethod
    def parse(cls, raw: Any) -> Snapshot:
        flat_counters, flat_holders, flat_orders = raw[1], raw[3], raw[4]
        records = {}
        for i in range(0, len(flat_orders), 2):
            records[_text(flat_orders[i])] = OrderRecord.unpack(flat_orders[i + 1])
        return cls(
            now_ms=int(raw[0]),
            counters={
                _text(flat_counters[i]): int(flat_counters[i + 1])
                for i in range(0, len(flat_counters), 2)
            },
            available=int(raw[2]),
            holders={
                _text(flat_holders[i]): int(flat_holders[i + 1])
                for i in range(0, len(flat_holders), 2)
            },
            records=records,
            created=StreamState.parse(raw[5]),
            changes=StreamState.parse(raw[6]),
            dead_letters=int(raw[7]),
            record_count=int(raw[8]),
            sku_stock={raw[9][i]: raw[9][i + 1] for i in range(0, len(raw[9]), 2)}
            if len(raw) > 9
            else {},
        )


async def _snapshot(client: Client, activity: Activity, deep_limit: int) -> Snapshot:
    parts = {}
    for space in buckets.spaces(activity.id, activity.buckets):
        raw = await _scripts().report_snapshot(
            client,
            keys.report_keys(space),
            [GROUP, PENDING_CAP, TAIL_CAP, "full", max(deep_limit // activity.buckets, -1)],
        )
        snap = Snapshot.parse(raw)
        snap.deep_allowed = deep_limit >= 0
        parts[space] = snap
    return Snapshot.merge(parts) if activity.buckets > 1 else parts[activity.id]


async def _positions(client: Client, activity: Activity) -> tuple[str, str]:
    orders, changes = [], []
    for space in buckets.spaces(activity.id, activity.buckets):
        raw = await _scripts().report_snapshot(
            client, keys.report_keys(space), [GROUP, PENDING_CAP, TAIL_CAP, "positions", 0]
        )
        orders.append(_text(raw[0]))
        changes.append(_text(raw[1]))
    return "|".join(orders), "|".join(changes)


async def _alive(client: Client) -> tuple[bool, bool]:
    pipe = client.pipeline(transaction=False)
    pipe.exists(keys.heartbeat("writer"))
    pipe.exists(keys.heartbeat("sweeper"))
    writer, sweeper = await pipe.execute()
    return bool(writer), bool(sweeper)


@dataclass(slots=True)
class StoreReading:
    """What the store said, in one statement, right after the snapshot."""

    in_store: int  # orders of the activity stored as of the snapshot
    # orders already stored whose creation entry the group still holds: pending (a committed
    # batch whose XACK was lost), or not even delivered (a writer that wrote an order's change,
    # which carries the whole record, before its creation entry)
    pending_stored: int
    rows: dict[str, OrderRecord] | None  # every stored order (None: per-order checks skipped)


async def _same_ms_undelivered(client: Client, activity_id: str, snap: Snapshot) -> set[str]:
    """The ids of ``_space_same_ms_undelivered`` over every bucket of the activity."""
    if not snap.parts:
        return await _space_same_ms_undelivered(client, activity_id, snap)
    found: set[str] = set()
    for space, part in snap.parts.items():
        found |= await _space_same_ms_undelivered(client, space, part)
    return found


async def _space_same_ms_undelivered(client: Client, activity_id: str, snap: Snapshot) -> set[str]:
    """Order ids of entries created in the last delivered entry's millisecond but not delivered.

    Creation time and entry id share Redis's clock, so "created after the last delivered
    millisecond" tells undelivered orders apart, except within that one millisecond: those few
    entries (at most one millisecond's worth) are named here. Entries are immutable, so reading
    them just after the snapshot is as good as inside it; one appended later was created after
    the snapshot and is not counted anyway.
    """
    last = snap.created.last_delivered_id
    if not snap.created.position or not last or last in ("0-0", "0"):
        return set()
    ms = last.partition("-")[0]
    entries: Any = await client.xrange(
        keys.stream(activity_id), min=f"({last}", max=f"{ms}-18446744073709551615", count=10_000
    )
    ids: set[str] = set()
    for _, fields in entries:
        with contextlib.suppress(Exception):  # an undecodable entry is the writer's concern
            ids.add(OrderRecord.unpack(fields[b"o"]).order_id)
    return ids


async def _read_store(
    store: OrderStore, activity_id: str, snap: Snapshot, same_ms: set[str]
) -> StoreReading:
    pending_ids = {oid for _, oid in snap.created.pending_entries if oid} | same_ms
    # an entry id is the Redis time its order was created at (both stamped by one script),
    # so an order created after the last delivered entry's millisecond was not delivered yet
    delivered_ms = snap.created.delivered_ms()
    if not snap.deep:
        total, pending_stored, undelivered_stored = await store.count_with(
            activity_id, sorted(pending_ids), delivered_ms
        )
        return StoreReading(total, pending_stored + undelivered_stored, None)
    rows = {r.order_id: r for r in await store.orders_of(activity_id)}
    # orders Redis holds, plus those that left it before the snapshot (an order leaves Redis
    # only once stored); one created after the snapshot is not counted
    counted = {
        oid: r
        for oid, r in rows.items()
        if oid in snap.records or r.created_at_ms < snap.taken_ms(oid)
    }
    undelivered_stored = sum(
        1 for oid, r in counted.items() if r.created_at_ms > snap.delivered_ms_of(oid)
    )
    return StoreReading(len(counted), len(pending_ids & counted.keys()) + undelivered_stored, rows)


async def build(
    client: Client, store: OrderStore, activity_id: str, *, deep_limit: int = DEEP_LIMIT
) -> dict[str, Any] | None:
    """The contract's report plus ``problems`` (what is wrong, in words); None if unknown.

    A negative ``deep_limit`` reads counts only (one store COUNT, no order records): the
    console's once-a-second reading, which must stay cheap however big the sale.
    """
    meta: Any = await client.hgetall(keys.meta(activity_id))
    if not meta:
        return None
    activity = Activity.from_meta(meta)
    stable = changes_stable = False
    fallback: tuple[Snapshot, StoreReading] | None = None
    for attempt in range(ATTEMPTS):
        snap = await _snapshot(client, activity, deep_limit)
        same_ms = await _same_ms_undelivered(client, activity_id, snap) if snap.deep else set()
        reading = await _read_store(store, activity_id, snap, same_ms)
        orders_at, changes_at = await _positions(client, activity)
        # with every stored order read (deep), the counts are exact whatever the writers read
        # meanwhile; a count alone needs them to have stood still
        counts_hold = snap.deep or orders_at == snap.created.position
        if counts_hold:
            if changes_at == snap.changes.position:
                stable = changes_stable = True
                break
            # the counts hold; only the status comparison needs the changes still too
            fallback = fallback or (snap, reading)
            if attempt >= FALLBACK_ATTEMPTS:
                break  # a busy sale: report the counts, compare statuses next time
        # a writer read entries meanwhile: they may or may not be in what the store said
        await asyncio.sleep(random.uniform(0.002, 0.01) * (1 + attempt % 5))
    if not stable and fallback is not None:
        (snap, reading), stable = fallback, True
    writer_alive, sweeper_alive = await _alive(client)
    body = _compare(
        activity_id, activity, snap, reading, stable, changes_stable, writer_alive, sweeper_alive
    )
    refunds = await _refunds(client, buckets.spaces(activity_id, activity.buckets))
    if refunds is not None:
        body["refunds"] = refunds
    return body


async def _refunds(client: Client, spaces: list[str]) -> dict[str, int] | None:
    """Refunds of refund_required payments by state, and the money they carry (few: late
    payments); None while the activity has none. Money still owed (pending, processing,
    attention) is owed, not inconsistent."""
    values: list[Any] = []
    for space in spaces:  # the activity's, and its buckets'
        values += await client.hvals(keys.refunds(space))
    if not values:
        return None
    counts = dict.fromkeys(("pending", "processing", "refunded", "attention"), 0)
    owed = refunded = 0
    for value in values:
        record = json.loads(value)
        status = str(record.get("status", ""))
        counts[status] = counts.get(status, 0) + 1
        if status == "refunded":
            refunded += int(record.get("amount_cents", 0))
        else:
            owed += int(record.get("amount_cents", 0))
    return {**counts, "owed_cents": owed, "refunded_cents": refunded}


def _compare(
    activity_id: str,
    activity: Activity,
    snap: Snapshot,
    reading: StoreReading,
    stable: bool,
    changes_stable: bool,
    writer_alive: bool,
    sweeper_alive: bool,
) -> dict[str, Any]:
    counters = snap.counters
    initial = counters.get("initial_stock", activity.stock)
    reserved = counters.get("reserved", 0)
    paid = counters.get("paid", 0)
    created = counters.get("orders_created", 0)
    available = snap.available
    sku_figures, problems = skus.problems(activity, snap.sku_stock, counters, available)

    if not writer_alive:
        problems.append("writer not running")
    if not sweeper_alive:
        problems.append("sweeper not running")
    if snap.dead_letters:
        problems.append(f"{snap.dead_letters} dead letters wait for a person")
    if not stable:
        problems.append("no stable reading: the writers kept reading while the store was read")
    if initial != available + reserved + paid:
        problems.append(
            f"stock: initial {initial} != available {available} + reserved {reserved} + paid {paid}"
        )

    in_store = reading.in_store
    queue = snap.created
    pending_write = queue.total - reading.pending_stored
    lost_pending = [eid for eid, oid in queue.pending_entries if not oid]
    if lost_pending:
        problems.append(
            f"{len(lost_pending)} pending entries of the orders stream were deleted before"
            f" they were written, e.g. {lost_pending[0]}"
        )
    if queue.deleted_unread():
        problems.append(
            "entries of the orders stream were deleted before the writers read them"
            f" (latest deleted: {queue.max_deleted_id})"
        )
    if queue.undelivered < 0:
        problems.append(
            f"orders backlog not countable now (at least {queue.lower_bound} unread after a"
            " Redis restart): counts unverified until the writers catch up"
        )
    elif queue.truncated:
        problems.append("too many pending entries to verify the order counts")
    elif in_store + pending_write != created:
        problems.append(
            f"orders: {in_store} stored + {pending_write} pending write != {created} created"
        )

    if reading.rows is not None:
        problems += _order_checks(activity, snap, reading.rows, changes_stable)

    return {
        "activity_id": activity_id,
        "initial_stock": initial,
        "available": available,
        "reserved": reserved,
        "paid": paid,
        "released": counters.get("released", 0),
        "orders_created": created,
        "orders_in_store": in_store,
        "orders_pending_write": pending_write,
        "changes_pending_write": snap.changes.total,
        "dead_letters": snap.dead_letters,
        "writer_alive": writer_alive,
        "sweeper_alive": sweeper_alive,
        "orders_checked": reading.rows is not None,
        **({"skus": sku_figures} if activity.skus else {}),
        **_bucket_figures(activity, counters),
        "consistent": not problems,
        "problems": problems,
    }


def _bucket_figures(activity: Activity, counters: dict[str, int]) -> dict[str, int]:
    """A bucketed activity's bucket count and units in transit between its buckets (counted
    in ``available``); nothing for one that is not."""
    if activity.buckets == 1:
        return {}
    return {
        "buckets": activity.buckets,
        "in_transit": counters.get("moved_out", 0) - counters.get("moved_in", 0),
    }


def _order_checks(
    activity: Activity, snap: Snapshot, stored: dict[str, OrderRecord], changes_stable: bool
) -> list[str]:
    """Per-order checks on the records Redis holds plus the stored orders that left Redis."""
    records = snap.records
    counters = snap.counters
    reserved = counters.get("reserved", 0)
    paid = counters.get("paid", 0)
    created = counters.get("orders_created", 0)
    problems: list[str] = []
    retired = {
        oid: r
        for oid, r in stored.items()
        if oid not in records and r.created_at_ms < snap.taken_ms(oid)
    }
    known = {**retired, **records}
    live_by_user: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    for record in known.values():
        by_status[record.status] += record.quantity
        if record.status in LIVE:
            live_by_user[record.user_id] += record.quantity
    over = skus.over_limit(activity, list(known.values()), live_by_user)
    if over:
        problems.append(f"{len(over)} users over the per-user limit, e.g. {over[0]!r}")
    if dict(live_by_user) != snap.holders:
        problems.append("holders disagree with the live orders")
    if by_status["reserved"] != reserved or by_status["paid"] != paid:
        problems.append("reserved/paid counters disagree with the order records")
    if len(known) != created:
        problems.append(
            f"{created - len(known)} of {created} created orders are neither in Redis nor"
            " in the store"
            if len(known) < created
            else f"{len(known)} orders known to Redis and the store != {created} created"
        )
    unended = sorted(oid for oid, r in retired.items() if r.status not in TERMINAL)
    if unended:
        problems.append(
            f"{len(unended)} stored orders not ended are missing from Redis, e.g. {unended[0]}"
        )
    if changes_stable and snap.changes.undelivered == 0 and not snap.changes.truncated:
        # every change made before the snapshot was delivered; those still pending may or may
        # not be in the store, so their orders are left out of the comparison
        touched = {oid for _, oid in snap.changes.pending_entries}
        differing = sorted(
            oid
            for oid, record in records.items()
            if oid in stored and oid not in touched and stored[oid].status != record.status
        )
        if differing:
            problems.append(
                f"{len(differing)} orders differ between Redis and the store, e.g. {differing[0]}"
            )
    return problems
