"""Per-process cache of activities, stock left and sold-out marks.

The sold-out fast path answers ``sold_out`` without Redis, but only to users who hold no order
in the activity: a winner's retry must still reach Redis and get its replayed 202. So a mark
carries a snapshot of the activity's holders, valid only for the ``orders_created`` count it
was taken at. Marks and snapshots are kept fresh by pub/sub events (sold out, restock, activity
changed) and by a periodic re-read, so a lost message or a returned item is corrected within
``refresh_interval_s``.

A bucketed activity (seckill/buckets.py) is read from all its buckets: stock left is their sum
(units in transit between buckets included), the holders their union, each bucket's holders
read atomically with its own order count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from seckill import buckets, keys
from seckill.activities import Activity
from seckill.connections import Client
from seckill.errors import RedisUnavailable
from seckill.events import Events, reraise_pending_cancel
from seckill.orders.streams import backlog
from seckill.scripts import CONNECTION_ERRORS, Scripts

log = logging.getLogger(__name__)

_MAX_NEGATIVE = 10_000
# what each bucket's counters say: orders created, and what it has left (buckets.left_of)
_BUCKET_COUNTS = ("orders_created", *buckets.LEFT_FIELDS)


def _bucket_sums(replies: list[Any]) -> tuple[int, int]:
    """(orders created, stock left) over every bucket's counters (_BUCKET_COUNTS)."""
    created = sum(int(counts[0] or 0) for counts in replies)
    return created, sum(buckets.left_of(counts[1:]) for counts in replies)


@dataclass(slots=True)
class Entry:
    """What this process knows of one activity."""

    activity: Activity
    stock_left: int
    orders_created: int
    # users holding orders, as of holders_version == orders_created; None: no usable snapshot
    holders: frozenset[str] | None = None
    holders_version: int = -1
    # SKU id -> quantity of it still on sale (empty for an activity from before SKUs)
    sku_left: dict[str, int] = field(default_factory=dict)
    # orders accepted and not yet written, and whether that passes [writer] backlog_ceiling
    # (read with each refresh, so the purchase path decides without a Redis call)
    backlog: int = 0
    over_ceiling: bool = False

    def sold_out_for(self, user_id: str, sku_id: str | None = None) -> bool:
        """True when the fast path may answer sold_out to this user without asking Redis.

        Per SKU: one SKU sold out answers at once while another still sells.
        """
        gone = self.stock_left <= 0 or (sku_id is not None and self.sku_left.get(sku_id, 1) <= 0)
        return (
            gone
            and self.holders is not None
            and self.holders_version == self.orders_created
            and user_id not in self.holders
        )


class Catalog:
    def __init__(
        self,
        client: Client,
        scripts: Scripts,
        *,
        refresh_interval_s: float,
        negative_cache_s: float,
        backlog_ceiling: int = 0,
    ):
        self._client = client
        self._scripts = scripts
        self._backlog_ceiling = backlog_ceiling
        self._refresh_interval_s = refresh_interval_s
        self._negative_cache_s = negative_cache_s
        self._entries: dict[str, Entry] = {}
        self._missing: dict[str, float] = {}
        self._loading: dict[str, asyncio.Future[Entry | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._settling: set[str] = set()  # bucketed activities whose sum is being re-read
        self._closed = False
        # every activity id that exists (sk:activities), refreshed with the catalog; None until
        # first read. An id outside it is unknown without a Redis call (storms of random ids).
        self._known: set[str] | None = None

    def entries(self) -> dict[str, Entry]:
        """The activities this process has seen."""
        return self._entries

    def known(self, activity_id: str) -> bool:
        """False only when the id is surely not an activity (no Redis call); True if it may be."""
        known = self._known
        return known is None or activity_id in known or activity_id in self._entries

    async def get(self, activity_id: str) -> Entry | None:
        """The cached entry, loading it once (single flight) on a miss; None if unknown."""
        entry = self._entries.get(activity_id)
        if entry is not None:
            return entry
        if self._known is not None and activity_id not in self._known:
            return None
        until = self._missing.get(activity_id)
        if until is not None and until > time.monotonic():
            return None
        loading = self._loading.get(activity_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._loading[activity_id] = future
        try:
            entry = await self._load(activity_id)
            future.set_result(entry)
            return entry
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._loading[activity_id]

    async def reload(self, activity_id: str) -> Entry | None:
        """Read the activity from Redis now, bypassing the cache (after this process changed it)."""
        return await self._load(activity_id)

    async def _load(self, activity_id: str) -> Entry | None:
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(keys.meta(activity_id))
            pipe.get(keys.stock(activity_id))
            pipe.hget(keys.counters(activity_id), "orders_created")
            pipe.hgetall(keys.sku_stock(activity_id))
            meta, stock, created, skus = await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        if not meta:
            if len(self._missing) >= _MAX_NEGATIVE:
                now = time.monotonic()
                self._missing = {k: v for k, v in self._missing.items() if v > now}
            self._missing[activity_id] = time.monotonic() + self._negative_cache_s
            self._entries.pop(activity_id, None)
            return None
        self._missing.pop(activity_id, None)
        if self._known is not None:
            self._known.add(activity_id)
        entry = Entry(Activity.from_meta(meta), int(stock or 0), int(created or 0))
        entry.sku_left = {k.decode(): int(v) for k, v in skus.items()}
        if entry.activity.buckets > 1:
            await self._read_buckets(entry)
        previous = self._entries.get(activity_id)
        if previous is not None and previous.activity == entry.activity:
            entry.holders, entry.holders_version = previous.holders, previous.holders_version
        some_gone = entry.stock_left <= 0 or any(v <= 0 for v in entry.sku_left.values())
        if some_gone and entry.holders_version != entry.orders_created:
            await self._snapshot_holders(activity_id, entry)
        if self._backlog_ceiling > 0:
            await self._read_backlog(activity_id, entry)
        self._entries[activity_id] = entry
        return entry

    async def _read_buckets(self, entry: Entry) -> None:
        activity = entry.activity
        pipe = self._client.pipeline(transaction=False)
        for space in buckets.spaces(activity.id, activity.buckets):
            pipe.hmget(keys.counters(space), *_BUCKET_COUNTS)
        try:
            replies = await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        entry.orders_created, entry.stock_left = _bucket_sums(replies)

    async def _snapshot_holders(self, activity_id: str, entry: Entry) -> None:
        if entry.activity.buckets > 1:
            await self._snapshot_bucket_holders(entry)
            return
        # one script so the holders and the count they belong to are read at the same instant
        stock, created, holders, skus, _ = await self._scripts.holders_snapshot(
            self._client, keys.holders_snapshot_keys(activity_id), []
        )
        entry.stock_left = int(stock)
        entry.sku_left = {skus[i].decode(): int(skus[i + 1]) for i in range(0, len(skus), 2)}
        entry.orders_created = int(created)
        entry.holders = frozenset(h.decode() for h in holders)
        entry.holders_version = entry.orders_created

    async def _snapshot_bucket_holders(self, entry: Entry) -> None:
        # one read-only script per bucket (one slot each): its holders and counts at one instant
        async def read(space: str) -> tuple[Any, Any]:
            _, _, holders, _, counts = await self._scripts.holders_snapshot(
                self._client, keys.holders_snapshot_keys(space), _BUCKET_COUNTS
            )
            return counts, holders

        activity = entry.activity
        readings = await asyncio.gather(
            *(read(s) for s in buckets.spaces(activity.id, activity.buckets))
        )
        entry.orders_created, entry.stock_left = _bucket_sums([c for c, _ in readings])
        entry.holders = frozenset(h.decode() for _, users in readings for h in users)
        entry.holders_version = entry.orders_created

    async def _read_backlog(self, activity_id: str, entry: Entry) -> None:
        total = 0
        try:
            for space in buckets.spaces(activity_id, entry.activity.buckets):
                total += (await backlog(self._client, keys.stream(space))).total
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        entry.backlog = total
        entry.over_ceiling = total > self._backlog_ceiling

    def note_reserved(
        self, activity_id: str, stock_left: int, sku_id: str = "", sku_left: int | None = None
    ) -> None:
        """A reservation here left ``stock_left`` (and ``sku_left`` of its SKU): at 0, tell all."""
        entry = self._entries.get(activity_id)
        if entry is None:
            return
        if entry.activity.buckets > 1:
            # ``stock_left`` is the buyer's bucket's: only the sum says sold out
            entry.orders_created += 1
            if stock_left <= 0:
                self._settle(activity_id)
            return
        entry.stock_left = stock_left
        if sku_id and sku_left is not None and sku_id in entry.sku_left:
            entry.sku_left[sku_id] = sku_left
        entry.orders_created += 1  # invalidates this process's holders snapshot at once
        if stock_left <= 0 or (sku_left is not None and sku_left <= 0):
            self._spawn(self._announce_sold_out(activity_id))

    def note_sold_out(self, activity_id: str) -> None:
        """Redis said sold_out but this process had no usable mark: re-read soon.

        For a bucketed activity that answer came from all buckets together (fewer units than
        asked for): re-read their sum, and at 0 tell every process.
        """
        entry = self._entries.get(activity_id)
        if entry is not None and entry.activity.buckets > 1:
            if entry.stock_left > 0:
                self._settle(activity_id)
        elif entry is not None and entry.holders is None:
            self._spawn(self._reload_quietly(activity_id))

    def _settle(self, activity_id: str) -> None:
        """Re-read a bucketed activity's sum, once at a time; at 0, tell every process."""
        if activity_id not in self._settling:
            self._settling.add(activity_id)
            self._spawn(self._settle_buckets(activity_id))

    async def _settle_buckets(self, activity_id: str) -> None:
        try:
            await self._reload_quietly(activity_id)
            entry = self._entries.get(activity_id)
            if entry is not None and entry.stock_left <= 0:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await self._client.publish(keys.EVENTS_CHANNEL, f"soldout:{activity_id}")
        finally:
            self._settling.discard(activity_id)

    async def _announce_sold_out(self, activity_id: str) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self._client.publish(keys.EVENTS_CHANNEL, f"soldout:{activity_id}")
        await self._reload_quietly(activity_id)

    async def _reload_quietly(self, activity_id: str) -> None:
        try:
            await self._load(activity_id)
        except (RedisUnavailable, *CONNECTION_ERRORS):  # type: ignore[misc]
            reraise_pending_cancel()
            log.warning("could not refresh activity %s", activity_id)

    async def refresh_all(self) -> None:
        """Re-read every cached activity (the periodic correction of lost events)."""
        await self.refresh_known()
        for activity_id in list(self._entries):
            await self._reload_quietly(activity_id)

    async def refresh_known(self) -> None:
        """Re-read the set of activity ids that exist (kept as it was if Redis is away)."""
        try:
            members: Any = await self._client.smembers(keys.ACTIVITIES)
        except CONNECTION_ERRORS:
            reraise_pending_cancel()
            return
        self._known = {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def listen(self, events: Events) -> None:
        """Follow activity changes, sell-outs and restocks announced by any process."""
        for kind in ("activity", "soldout", "restock"):
            events.on(kind, self._handler(kind), self.refresh_all)

    def _handler(self, kind: str) -> Callable[[str], None]:
        return lambda subject: self._on_event(kind, subject)

    def _on_event(self, kind: str, activity_id: str) -> None:
        if kind == "activity":
            self._missing.pop(activity_id, None)
            if self._known is not None:
                self._known.add(activity_id)
        if activity_id in self._entries or kind == "activity":
            self._spawn(self._reload_quietly(activity_id))

    def close(self) -> None:
        """Make run() return at its next step (it is also cancelled; see run)."""
        self._closed = True

    async def run(self) -> None:
        """Background work: the pub/sub listener and the periodic refresh, until closed.

        Stopping rests on close() as well as on cancellation: a client library that turns a
        cancellation into a connection error (an exception raised in a ``finally`` while the
        connection is torn down) would otherwise keep this loop alive forever.
        """
        try:
            await self.refresh_known()
            while not self._closed:
                await asyncio.sleep(self._refresh_interval_s)
                await self.refresh_all()
        finally:
            for task in list(self._tasks):
                task.cancel()
