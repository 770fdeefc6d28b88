"""The order writer: Redis Streams -> the order store, at the pace the database can take.

One consumer group (``writers``) over every activity's orders and changes streams, so several
writers share the work. Each batch is committed **then** acknowledged: a writer killed between
the two leaves its entries pending, and the next delivery is harmless because every store write
is idempotent. On start a writer first takes back its own pending entries; entries of a writer
gone for ``claim_idle_ms`` are claimed by a live one.

Faults, each with one meaning:

- the store is away (``StoreUnavailable``: unreachable, read-only, deadlock, timeout, locked):
  the same batch is retried in memory with backoff behind the store breaker, never counted
  against its entries;
- the store refused the batch (``EntryRejected``): the batch is split until the entries that
  fail by themselves are found; only those count failed attempts, and one refused
  ``max_deliveries`` times moves to the activity's dead-letter stream. An undecodable entry and
  an illegal transition go there at once. Nothing is dead-lettered while the breaker is open;
- Redis is unreachable or answers an error (READONLY, OOM, MISCONF, NOREPLICAS, LOADING …),
  or, with durability "replicated", no replica confirms what was read (orders/fence.py):
  logged once, then counted; the loop backs off and goes on. A missing group (NOGROUP) is
  recreated. Acknowledgements that Redis refused are kept and sent first when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from redis import exceptions as redis_errors

from seckill.breakers import AsyncBreaker, BreakerOpen
from seckill.connections import Client
from seckill.errors import NotReplicated, RedisUnavailable
from seckill.orders import claims, deadletters
from seckill.orders.entries import (
    Entry,
    Item,
    PoisonEntry,
    activity_of,
    batch_of,
    decode,
    is_orders,
)
from seckill.orders.fence import Fence
from seckill.orders.intake import Intake
from seckill.orders.store import (
    EntryRejected,
    OrderStore,
    StoreUnavailable,
    WriteResult,
)
from seckill.orders.streams import GROUP, backlog, oldest_waiting_ms, trim_persisted
from seckill.scripts import CONNECTION_ERRORS
from seckill.throttle import LocalBucket

log = logging.getLogger(__name__)

# What "Redis did not answer" looks like, whether raised by redis-py or by a script call (or
# "no replica holds it yet", the same for the writer: wait, read it again, never lose it).
REDIS_AWAY: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    RedisUnavailable,
    NotReplicated,
)
# ... or answer with an error reply (READONLY, OOM, MISCONF, NOREPLICAS, NOGROUP …).
REDIS_FAULTS: tuple[type[BaseException], ...] = (*REDIS_AWAY, redis_errors.ResponseError)


@dataclass(frozen=True, slots=True)
class WriterConfig:
    batch_size: int = 500
    block_ms: int = 500
    max_rows_per_s: float = 5000.0
    claim_idle_ms: int = 30_000
    retry_idle_ms: int = 1_000
    max_deliveries: int = 5  # failed store attempts of one entry before it is dead-lettered
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
    store_failures: int = 0  # the store was away (retried), by attempt
    entries_rejected: int = 0  # one entry refused by a healthy store, by attempt
    acks_deferred: int = 0  # entries committed whose XACK waited for Redis
    redis_errors: int = 0  # Redis unreachable or answering an error, by loop round
    consumers_forgotten: int = 0
    trimmed: int = 0
    entries_gone: int = 0  # read, then lost by Redis in a failover before a replica had them


def _fault_kind(exc: BaseException) -> str:
    """A short, bounded name for a Redis fault: the error reply's code, or "connection"."""
    if isinstance(exc, NotReplicated):
        return "not_replicated"
    if isinstance(exc, redis_errors.ResponseError):
        if type(exc) is not redis_errors.ResponseError:
            return type(exc).__name__  # redis-py strips the code of the replies it maps
        word = str(exc).split(" ", 1)[0]
        return word if word.isupper() and word.isalpha() and len(word) <= 16 else "ERR"
    return "connection"


class Writer:
    def __init__(
        self,
        client: Client,
        store: OrderStore,
        config: WriterConfig | None = None,
        consumer: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.config = config or WriterConfig()
        # durability "replicated": nothing read goes to the store before a replica holds it
        self.fence = fence
        self._waiting_for_replica = False
        self.slot = claims.ConsumerSlot(client, consumer)
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
        self.intake = Intake(client, self.config.batch_size, self.config.block_ms)
        # activity -> (orders not yet persisted, age in seconds of the oldest of them)
        self.backlog: dict[str, tuple[int, float]] = {}
        # (stream, id) -> failed store attempts of an entry refused by itself (in memory: a
        # restarted writer starts again from 0, which only delays a dead letter)
        self.attempts: dict[tuple[str, str], int] = {}
        # stream -> ids committed to the store whose XACK Redis has not taken yet
        self._unacked: dict[str, set[str]] = defaultdict(set)
        # rows per transaction: batch_size, less after batches timed out by their size
        self._rows_cap = self.config.batch_size
        self._rows_cap_passed = 0
        # Redis faults of the current streak, by kind: logged once, then counted
        self.faults: Counter[str] = Counter()

    @property
    def consumer(self) -> str:
        """This writer's name in the group (the host name until the slot is claimed)."""
        return self.slot.name

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set; the batch in hand is finished first.

        Returns only when ``stop`` is set: every fault of Redis or of the store is waited out.
        Anything else (a bug) is raised to the supervisor, the consumer name given back first
        so that the writer restarted in its place gets it again.
        """
        try:
            await self._loop(stop)
        except Exception:
            with contextlib.suppress(Exception):
                await self.slot.release()
            raise
        with contextlib.suppress(*REDIS_FAULTS):
            await self._flush_acks()
            await self.slot.release()

    async def _loop(self, stop: asyncio.Event) -> None:
        await self._migrate(stop)
        next_discover = next_recover = next_trim = 0.0
        recovered = False  # our own pending entries taken back, whatever their age
        delay = 0.0
        while not stop.is_set():
            try:
                await self._flush_acks()
                await self.slot.claim()
                now = time.monotonic()
                if now >= next_discover:
                    await self.slot.keep()
                    await self.intake.discover()
                    await self._sample_backlog()
                    next_discover = now + self.config.discover_interval_s
                if not recovered or now >= next_recover:
                    await self._recover(stop, own_any_age=not recovered)
                    recovered = True
                    next_recover = now + self.config.retry_idle_ms / 1000
                if now >= next_trim:
                    await self._trim()
                    next_trim = now + self.config.trim_interval_s
                entries = await self.intake.read(self.consumer)
                if entries:
                    await self._apply(entries, stop)
                elif not self.intake.streams:
                    await self._pause(stop, self.config.block_ms / 1000)
                self._recovered_from_faults()
                delay = 0.0
            except redis_errors.ResponseError as exc:
                self._fault(exc)
                if "NOGROUP" in str(exc):
                    # deleted group or stream: recreate it and read it again from the start
                    # (acknowledged entries were trimmed; the rest is rewritten idempotently)
                    self.intake.forget()
                    next_discover = 0.0
                    recovered = False
                delay = self._next_delay(delay)
                await self._pause(stop, delay)
            except REDIS_AWAY as exc:
                self._fault(exc)
                delay = self._next_delay(delay)
                await self._pause(stop, delay)

    def _next_delay(self, delay: float) -> float:
        return min(max(delay * 2, 0.1), self.config.backoff_max_s)

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    def _fault(self, exc: BaseException) -> None:
        kind = _fault_kind(exc)
        self.stats.redis_errors += 1
        if kind not in self.faults:
            log.warning("Redis fault (%s): %s; the writer backs off and goes on", kind, exc)
        self.faults[kind] += 1

    def _recovered_from_faults(self) -> None:
        # a round that read nothing says nothing of a replica still missing
        if self.faults and not self._waiting_for_replica:
            log.info("Redis answers again; faults meanwhile: %s", dict(self.faults))
            self.faults.clear()

    async def drain(self, stop: asyncio.Event | None = None, idle_rounds: int = 2) -> None:
        """Write until nothing is left to read (tests, `seckill reconcile --drain`)."""
        stop = stop or asyncio.Event()
        await self._migrate(stop)
        await self._flush_acks()
        await self.slot.claim()
        await self.intake.discover()
        await self._recover(stop, own_any_age=True)
        quiet = 0
        while quiet < idle_rounds and not stop.is_set():
            entries = await self.intake.read(self.consumer, block=False)
            if entries:
                quiet = 0
                await self._apply(entries, stop)
            else:
                quiet += 1

    async def _discover(self) -> None:
        # kept under its old name: tests/web/test_metrics.py samples a writer without its loop
        await self.intake.discover()

    async def _migrate(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.migrate()
                return
            except StoreUnavailable as exc:
                self.stats.store_failures += 1
                log.warning("order store unavailable at start (%s); retrying in %.1fs", exc, delay)
                await self._pause(stop, delay)
                if stop.is_set():
                    raise
                delay = min(delay * 2, self.config.backoff_max_s)

    # -- recovery: own pending entries, gone writers' entries --------------------------------

    async def _recover(self, stop: asyncio.Event, own_any_age: bool) -> None:
        for stream in list(self.intake.streams):
            try:
                await self._recover_stream(stream, stop, own_any_age)
            except NotReplicated as exc:
                self._fault(exc)  # this key space's replica is missing: the others go on

    async def _recover_stream(self, stream: str, stop: asyncio.Event, own_any_age: bool) -> None:
        size = self.config.batch_size
        after = "-"
        # our own first: on start every one (a batch killed between commit and XACK),
        # later the ones refused and due for another attempt
        while not stop.is_set():
            idle = 0 if own_any_age else self.config.retry_idle_ms
            entries = await claims.own_pending(
                self.client, stream, self.consumer, idle, size, after
            )
            if entries:
                await self._apply(entries, stop)
            if len(entries) < size:
                break
            after = "(" + entries[-1].entry_id
        cursor = "0-0"
        while not stop.is_set():
            entries, cursor = await claims.take_over(
                self.client, stream, self.consumer, self.config.claim_idle_ms, size, cursor
            )
            if entries:
                log.info("took over %d entries of %s from a writer gone", len(entries), stream)
                await self._apply(entries, stop)
            if cursor == "0-0":
                break
        self.stats.consumers_forgotten += await claims.forget_gone(
            self.client, stream, self.consumer, self.config.claim_idle_ms
        )

    # -- writing ----------------------------------------------------------------------------

    async def _apply(self, entries: list[Entry], stop: asyncio.Event) -> None:
        """Write what decodes, dead-letter what never will; acknowledge what is stored."""
        if self.fence is not None:
            entries = await self._fenced(entries)
        decoded: list[tuple[Entry, Item]] = []
        for entry in entries:
            try:
                decoded.append((entry, decode(entry.stream, entry.fields)))
            except PoisonEntry as exc:
                # no store will ever take it: no attempt needed (while the breaker is closed;
                # otherwise it stays pending and comes back with the retries)
                if self.breaker.state == "closed":
                    await self._dead_letter(entry, str(exc), 0)
        if not decoded:
            return
        await self._bucket.take(len(decoded))
        with contextlib.suppress(StoreUnavailable):  # stopping while the store is away
            for start in range(0, len(decoded), self._rows_cap):
                await self._store(decoded[start : start + self._rows_cap], stop)

    async def _fenced(self, entries: list[Entry]) -> list[Entry]:
        """The entries a replica holds; the others stay pending (read again) or are gone.

        NotReplicated when no key space of the batch was confirmed (a Redis fault to the loop).
        """
        assert self.fence is not None
        fenced = await self.fence.sort(entries)
        for entry in fenced.gone:
            # its buyer got a 503 (no replica confirmed it) and the promoted replica never had
            # it: no order to store, and nothing of it left in Redis to acknowledge
            self.stats.entries_gone += 1
            log.warning(
                "entry %s of %s was lost by Redis in a failover before a replica had it;"
                " not stored",
                entry.entry_id,
                entry.stream,
            )
        self._waiting_for_replica = bool(fenced.waiting)
        if fenced.waiting and fenced.fault is not None:
            if not fenced.held:
                raise fenced.fault
            self._fault(fenced.fault)
        return fenced.held

    async def _store(self, pairs: list[tuple[Entry, Item]], stop: asyncio.Event) -> None:
        """One transaction; on EntryRejected, halves until the entries refused alone are found."""
        try:
            result = await self._write([item for _, item in pairs], stop)
        except _TooBig:
            # remember the size that passes, so the next batches do not time out first
            self._rows_cap = max(1, len(pairs) // 2)
            self._rows_cap_passed = 0
            middle = len(pairs) // 2
            await self._store(pairs[:middle], stop)
            await self._store(pairs[middle:], stop)
            return
        except EntryRejected as exc:
            if len(pairs) == 1:
                await self._refused(pairs[0][0], exc)
                return
            log.warning("batch of %d refused by the store (%s); splitting it", len(pairs), exc)
            middle = len(pairs) // 2
            await self._store(pairs[:middle], stop)
            await self._store(pairs[middle:], stop)
            return
        self.stats.batches += 1
        self.stats.rows += len(pairs)
        if len(pairs) >= self._rows_cap and self._rows_cap < self.config.batch_size:
            self._rows_cap_passed += 1
            if self._rows_cap_passed >= 10:  # the database took it 10 times: try bigger
                self._rows_cap = min(self.config.batch_size, self._rows_cap * 2)
                self._rows_cap_passed = 0
        self.stats.inserted += result.inserted
        illegal = {id(change) for change in result.illegal}
        stored = [entry for entry, item in pairs if id(item) not in illegal]
        for entry in stored:
            self.attempts.pop(entry.key, None)
        await self._ack(stored)
        for entry, item in pairs:
            if id(item) in illegal:
                self.stats.illegal_transitions += 1
                await self._dead_letter(entry, _illegal_reason(result, item), 1)

    async def _write(self, items: list[Item], stop: asyncio.Event) -> WriteResult:
        """One store transaction, retried with backoff while the database is away."""
        delay = 0.05
        timeouts = 0
        while True:
            try:
                return await self.breaker.call(lambda: self.store.write(batch_of(items)))
            except (StoreUnavailable, BreakerOpen) as exc:
                self.stats.store_failures += isinstance(exc, StoreUnavailable)
                if stop.is_set():
                    raise StoreUnavailable(str(exc)) from exc
                if isinstance(exc, StoreUnavailable) and exc.smaller_may_pass:
                    timeouts += 1
                    # a batch timing out again and again may just be too big for the
                    # database's statement timeout: halves (nothing counted against entries)
                    if timeouts >= 3 and len(items) > 1:
                        raise _TooBig() from exc
                log.warning("order store away (%s); retrying in %.2fs", exc, delay)
                await self._pause(stop, delay)
                delay = min(delay * 2, self.config.backoff_max_s)

    async def _refused(self, entry: Entry, exc: EntryRejected) -> None:
        """One entry refused by itself: count the attempt; dead-letter it at max_deliveries."""
        self.stats.entries_rejected += 1
        attempts = self.attempts.get(entry.key, 0) + 1
        self.attempts[entry.key] = attempts
        if attempts >= self.config.max_deliveries:
            await self._dead_letter(entry, f"refused by the store: {exc}", attempts)
            return
        # left pending: our next recovery round (retry_idle_ms) tries it again
        log.warning(
            "entry %s of %s refused by the store (attempt %d of %d): %s",
            entry.entry_id,
            entry.stream,
            attempts,
            self.config.max_deliveries,
            exc,
        )

    async def _dead_letter(self, entry: Entry, reason: str, attempts: int) -> None:
        moved = await deadletters.move(self.client, entry.stream, entry.entry_id, reason, attempts)
        self.attempts.pop(entry.key, None)
        if moved is None:
            return  # no longer pending: another writer stored it meanwhile
        self.stats.dead_letters += 1
        log.error(
            "entry %s of %s moved to the dead-letter stream as %s: %s",
            entry.entry_id,
            entry.stream,
            moved,
            reason,
        )

    async def _ack(self, entries: list[Entry]) -> None:
        """Acknowledge stored entries; kept in memory and sent first while Redis refuses."""
        for entry in entries:
            self._unacked[entry.stream].add(entry.entry_id)
        try:
            await self._flush_acks()
        except REDIS_FAULTS:
            self.stats.acks_deferred += len(entries)
            raise

    async def _flush_acks(self) -> None:
        for stream in list(self._unacked):
            ids = self._unacked[stream]
            if ids:
                await self.client.xack(stream, GROUP, *sorted(ids))
            del self._unacked[stream]

    # -- upkeep -----------------------------------------------------------------------------

    async def _sample_backlog(self) -> None:
        """Backlog and lag of every orders stream, for the metrics (O(1) per stream)."""
        now_ms = time.time() * 1000
        for stream in self.intake.streams:
            if not is_orders(stream):
                continue
            waiting = await backlog(self.client, stream)
            oldest = await oldest_waiting_ms(self.client, stream) if waiting.total else None
            lag = max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0
            self.backlog[activity_of(stream)] = (waiting.total, lag)

    async def _trim(self) -> None:
        for stream in self.intake.streams:
            self.stats.trimmed += await trim_persisted(self.client, stream)


class _TooBig(Exception):
    """A batch timed out repeatedly: write it in halves."""


def _illegal_reason(result: WriteResult, item: Item) -> str:
    change = next(c for c in result.illegal if c is item)
    return (
        f"illegal transition {change.from_state} -> {change.to_state}"
        f" of order {change.order.order_id}"
    )
