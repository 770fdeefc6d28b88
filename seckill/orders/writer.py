"""The order writer: Redis Streams -> the order store, at the pace the database can take.

One consumer group (``writers``) over every activity's orders and changes streams, so several
writers share the work. Each batch is committed **then** acknowledged: a writer killed between
the two leaves its entries pending, and the next delivery is harmless because every store write
is idempotent. On start a writer first takes back its own pending entries; entries of a dead
writer idle for ``claim_idle_ms`` are claimed by a live one; an entry delivered
``max_deliveries`` times moves to the activity's dead-letter stream so the rest flows on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.asyncio import Redis

from seckill import keys
from seckill.breakers import AsyncBreaker, BreakerOpen
from seckill.orders.record import OrderRecord
from seckill.orders.store import (
    Batch,
    OrderStore,
    PaymentEvent,
    StoreUnavailable,
    Transition,
    WriteResult,
)
from seckill.orders.streams import GROUP, backlog, ensure_group, trim_persisted
from seckill.scripts import CONNECTION_ERRORS
from seckill.throttle import LocalBucket

log = logging.getLogger(__name__)

Entry = tuple[str, str, dict[bytes, bytes]]  # stream, entry id, fields


@dataclass(frozen=True, slots=True)
class WriterConfig:
    batch_size: int = 500
    block_ms: int = 500
    max_rows_per_s: float = 5000.0
    claim_idle_ms: int = 30_000
    retry_idle_ms: int = 1_000
    max_deliveries: int = 5
    trim_interval_s: float = 5.0
    discover_interval_s: float = 1.0
    backoff_max_s: float = 5.0
    store_fail_max: int = 3
    store_reset_timeout_s: float = 2.0


@dataclass(slots=True)
class WriterStats:
    """Cumulative counts, read by the metrics collector."""

    batches: int = 0
    rows: int = 0
    inserted: int = 0
    dead_letters: int = 0
    illegal_transitions: int = 0
    store_failures: int = 0
    trimmed: int = 0


class PoisonEntry(ValueError):
    """An entry that cannot be decoded; it is never acknowledged until dead-lettered."""


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(stream: str, fields: dict[bytes, bytes]) -> OrderRecord | Transition | PaymentEvent:
    """One stream entry as a store operation; PoisonEntry when it makes no sense."""
    try:
        if stream.endswith(":stream"):
            return OrderRecord.unpack(fields[b"o"])
        change: dict[str, Any] = msgpack.unpackb(fields[b"c"], raw=False)
        if change["kind"] == "transition":
            return Transition(
                order=OrderRecord.unpack(msgpack.packb(change["order"])),
                from_state=str(change["from"]),
                to_state=str(change["to"]),
                at_ms=int(change["at"]),
            )
        if change["kind"] == "payment":
            return PaymentEvent(
                event_id=str(change["event_id"]),
                order_id=str(change["order_id"]),
                amount_cents=int(change["amount_cents"]),
                result=str(change["result"]),
                at_ms=int(change["at"]),
            )
        raise PoisonEntry(f"unknown change kind {change['kind']!r}")
    except PoisonEntry:
        raise
    except Exception as exc:
        raise PoisonEntry(f"undecodable entry: {exc!r}") from exc


def _batch(items: list[OrderRecord | Transition | PaymentEvent]) -> Batch:
    batch = Batch()
    for item in items:
        if isinstance(item, OrderRecord):
            batch.created.append(item)
        elif isinstance(item, Transition):
            batch.transitions.append(item)
        else:
            batch.payments.append(item)
    return batch


class Writer:
    def __init__(
        self,
        client: Redis,
        store: OrderStore,
        config: WriterConfig | None = None,
        consumer: str | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.config = config or WriterConfig()
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.stats = WriterStats()
        # open after a few outages in a row: the database is then left alone for a while
        self.breaker = AsyncBreaker(
            "store",
            fail_max=self.config.store_fail_max,
            reset_timeout_s=self.config.store_reset_timeout_s,
            failures=(StoreUnavailable,),
        )
        # a tenth of a second of burst: a restarted writer must not start with a free second
        rate = self.config.max_rows_per_s
        self._bucket = LocalBucket(rate, max(rate / 10, 1.0))
        self._streams: list[str] = []
        # activity -> (orders not yet persisted, age in seconds of the oldest of them)
        self.backlog: dict[str, tuple[int, float]] = {}
        self._known: set[str] = set()

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set; the batch in hand is finished first."""
        await self._migrate(stop)
        next_discover = next_recover = next_trim = 0.0
        first = True
        while not stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_discover:
                    await self._discover()
                    await self._sample_backlog()
                    next_discover = now + self.config.discover_interval_s
                if first or now >= next_recover:
                    # on start: our own pending entries first, whatever their age
                    await self._recover(stop, own_any_age=first)
                    first = False
                    next_recover = now + self.config.retry_idle_ms / 1000
                if now >= next_trim:
                    await self._trim()
                    next_trim = now + self.config.trim_interval_s
                entries = await self._read_new()
                if entries:
                    await self._process(entries, stop)
            except CONNECTION_ERRORS:
                log.warning("Redis unreachable; the writer retries in 1 s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def drain(self, stop: asyncio.Event | None = None, idle_rounds: int = 2) -> None:
        """Write until nothing is left to read (tests, `seckill reconcile --drain`)."""
        stop = stop or asyncio.Event()
        await self._migrate(stop)
        await self._discover()
        await self._recover(stop, own_any_age=True)
        quiet = 0
        while quiet < idle_rounds and not stop.is_set():
            entries = await self._read_new(block=False)
            if entries:
                quiet = 0
                await self._process(entries, stop)
            else:
                quiet += 1

    async def _migrate(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.migrate()
                return
            except StoreUnavailable as exc:
                self.stats.store_failures += 1
                log.warning("order store unavailable at start (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    raise
                delay = min(delay * 2, self.config.backoff_max_s)

    async def _discover(self) -> None:
        members: Any = await self.client.smembers(keys.ACTIVITIES)
        activity_ids = sorted(m.decode() for m in members)
        for activity_id in activity_ids:
            for stream in (keys.stream(activity_id), keys.changes(activity_id)):
                if stream not in self._known:
                    await ensure_group(self.client, stream)
                    self._known.add(stream)
                    self._streams.append(stream)

    async def _read_new(self, block: bool = True) -> list[Entry]:
        if not self._streams:
            if block:
                await asyncio.sleep(self.config.block_ms / 1000)
            return []
        # Orders first; changes only once the orders are drained. A change is added after its
        # order's creation, so a creation is always written before (or with) its changes.
        orders = [s for s in self._streams if s.endswith(":stream")]
        entries = await self._read(orders, self.config.batch_size, None)
        room = self.config.batch_size - len(entries)
        if room > 0:
            wait = self.config.block_ms if block and not entries else None
            entries += await self._read(self._streams, room, wait)
        return entries

    async def _read(self, streams: list[str], count: int, block_ms: int | None) -> list[Entry]:
        if not streams:
            return []
        reply: Any = await self.client.xreadgroup(
            GROUP, self.consumer, dict.fromkeys(streams, ">"), count=count, block=block_ms
        )
        return [
            (stream.decode(), entry_id.decode(), fields)
            for stream, messages in reply or []
            for entry_id, fields in messages
        ]

    # -- recovery: own pending, dead writers' entries, poison -------------------------------

    async def _recover(self, stop: asyncio.Event, own_any_age: bool) -> None:
        for stream in list(self._streams):
            await self._recover_own(stream, stop, own_any_age)
            await self._take_over(stream, stop)

    async def _recover_own(self, stream: str, stop: asyncio.Event, any_age: bool) -> None:
        """Re-deliver our own pending entries (all of them on start; refused ones later)."""
        while not stop.is_set():
            pending: Any = await self.client.xpending_range(
                stream,
                GROUP,
                min="-",
                max="+",
                count=self.config.batch_size,
                consumername=self.consumer,
                idle=0 if any_age else self.config.retry_idle_ms,
            )
            if not pending:
                return
            # the number this delivery will have: XCLAIM counts it, which is what lets a
            # poison entry reach the limit
            counts = {p["message_id"].decode(): int(p["times_delivered"]) + 1 for p in pending}
            messages: Any = await self.client.xclaim(stream, GROUP, self.consumer, 0, list(counts))
            await self._redeliver(stream, messages, counts, stop)
            if len(pending) < self.config.batch_size:
                return

    async def _take_over(self, stream: str, stop: asyncio.Event) -> None:
        """XAUTOCLAIM what writers that stopped answering left pending for claim_idle_ms."""
        cursor: Any = "0-0"
        while not stop.is_set():
            reply: Any = await self.client.xautoclaim(
                stream,
                GROUP,
                self.consumer,
                self.config.claim_idle_ms,
                cursor,
                count=self.config.batch_size,
            )
            cursor, messages = reply[0], reply[1]
            if messages:
                claimed = [m[0].decode() for m in messages]
                pending: Any = await self.client.xpending_range(
                    stream,
                    GROUP,
                    min=claimed[0],
                    max=claimed[-1],
                    count=len(claimed) * 2,
                    consumername=self.consumer,
                )
                counts = {p["message_id"].decode(): int(p["times_delivered"]) for p in pending}
                await self._redeliver(stream, messages, counts, stop)
            if _id(cursor) == "0-0":
                return

    async def _redeliver(
        self, stream: str, messages: Any, counts: dict[str, int], stop: asyncio.Event
    ) -> None:
        """Process claimed entries; one past its max_deliveries-th delivery is dead-lettered."""
        entries: list[Entry] = []
        for entry_id, fields in messages:
            identifier = entry_id.decode()
            if counts.get(identifier, 0) > self.config.max_deliveries:
                await self._dead_letter(stream, identifier)
            elif fields is not None:
                entries.append((stream, identifier, fields))
        if entries:
            await self._process(entries, stop)

    async def _dead_letter(self, stream: str, entry_id: str) -> None:
        activity_id = stream.split("{a:", 1)[1].split("}", 1)[0]
        messages: Any = await self.client.xrange(stream, min=entry_id, max=entry_id)
        fields = dict(messages[0][1]) if messages else {}
        fields.update({b"origin_stream": stream.encode(), b"origin_id": entry_id.encode()})
        await self.client.xadd(keys.dead_letters(activity_id), fields)
        await self.client.xack(stream, GROUP, entry_id)
        self.stats.dead_letters += 1
        log.error("entry %s of %s moved to the dead-letter stream", entry_id, stream)

    # -- writing ----------------------------------------------------------------------------

    async def _process(self, entries: list[Entry], stop: asyncio.Event) -> None:
        decoded: list[tuple[Entry, OrderRecord | Transition | PaymentEvent]] = []
        for entry in entries:
            try:
                decoded.append((entry, decode(entry[0], entry[2])))
            except PoisonEntry as exc:
                # left pending: redelivered after retry_idle_ms, dead-lettered in the end
                log.warning("entry %s of %s refused: %s", entry[1], entry[0], exc)
        if not decoded:
            return
        await self._bucket.take(len(decoded))
        try:
            result = await self._write([item for _, item in decoded], stop)
        except StoreUnavailable:
            return  # stopping while the store is away: entries stay pending, nothing lost
        except Exception:
            log.exception("batch refused by the store; writing its entries one by one")
            for entry, item in decoded:
                try:
                    await self._account(await self._write([item], stop))
                except StoreUnavailable:
                    return
                except Exception:
                    log.exception("entry %s of %s refused by the store", entry[1], entry[0])
                    continue
                await self._ack([entry])
            return
        await self._account(result)
        await self._ack([entry for entry, _ in decoded])
        self.stats.batches += 1
        self.stats.rows += len(decoded)

    async def _write(
        self, items: list[OrderRecord | Transition | PaymentEvent], stop: asyncio.Event
    ) -> WriteResult:
        """One store transaction, retried with backoff while the database is away."""
        delay = 0.05
        while True:
            try:
                return await self.breaker.call(lambda: self.store.write(_batch(items)))
            except (StoreUnavailable, BreakerOpen) as exc:
                self.stats.store_failures += 1
                if stop.is_set():
                    raise StoreUnavailable(str(exc)) from exc
                log.warning("order store unavailable (%r); retrying in %.2fs", exc, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, self.config.backoff_max_s)

    async def _account(self, result: WriteResult) -> None:
        self.stats.inserted += result.inserted
        for change in result.illegal:
            self.stats.illegal_transitions += 1
            log.error(
                "illegal transition %s -> %s of order %s refused",
                change.from_state,
                change.to_state,
                change.order.order_id,
            )

    async def _ack(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[str]] = defaultdict(list)
        for stream, entry_id, _ in entries:
            by_stream[stream].append(entry_id)
        for stream, ids in by_stream.items():
            await self.client.xack(stream, GROUP, *ids)

    async def _sample_backlog(self) -> None:
        """Backlog and lag of every orders stream, for the metrics."""
        now_ms = time.time() * 1000
        for stream in self._streams:
            if not stream.endswith(":stream"):
                continue
            activity_id = stream.split("{a:", 1)[1].split("}", 1)[0]
            waiting = await backlog(self.client, stream)
            oldest: Any = None
            if waiting.pending:
                summary: Any = await self.client.xpending(stream, GROUP)
                oldest = summary["min"]
            elif waiting.undelivered:
                groups: Any = await self.client.xinfo_groups(stream)
                last = next(
                    (_id(g["last-delivered-id"]) for g in groups if _id(g["name"]) == GROUP), "0-0"
                )
                following: Any = await self.client.xrange(stream, min=f"({last}", max="+", count=1)
                oldest = following[0][0] if following else None
            lag = max(0.0, (now_ms - int(_id(oldest).split("-")[0])) / 1000) if oldest else 0.0
            self.backlog[activity_id] = (waiting.total, lag)

    async def _trim(self) -> None:
        for stream in self._streams:
            self.stats.trimmed += await trim_persisted(self.client, stream)
