"""The Retirer: ended orders leave Redis once the store holds them in that state.

Redis keeps each order's record for the purchase path and the owner's reads; once an order has
ended (paid, cancelled, expired) nothing on the hot path needs it, and keeping it would grow
Redis without bound (a shopper looping reserve -> cancel adds a record per cycle). The scripts
that end an order queue it in the activity's ``retiring`` sorted set (score: Redis time). One
pass per second takes the ids queued more than ``grace_s`` ago, asks the store for their
statuses in one query, and retire_orders.lua drops each record whose Redis status equals the
stored one. A record whose ending the store has not recorded yet stays, and is looked at again
on the next pass. Reads of a retired order are answered from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors

from seckill import keys
from seckill.buckets import key_spaces
from seckill.connections import Client
from seckill.errors import RedisUnavailable
from seckill.orders.store import OrderStore, StoreUnavailable
from seckill.scripts import CONNECTION_ERRORS, Scripts
from seckill.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RetirerStats:
    """Cumulative counts, for metrics and tests."""

    retired: int = 0
    passes: int = 0
    failures: int = 0


class Retirer:
    def __init__(
        self,
        client: Client,
        store: OrderStore,
        scripts: Scripts | None = None,
        *,
        interval_s: float = 1.0,
        grace_s: float = 5.0,
        batch_size: int = 500,
        max_batches: int = 20,
        requeue_after_s: float = 60.0,
    ) -> None:
        self.client = client
        self.store = store
        self.scripts = scripts or Scripts.from_dir()
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.batch_size = batch_size
        # store queries per activity and pass, at most (the database never sees a storm)
        self.max_batches = max_batches
        self.requeue_after_s = requeue_after_s
        self.stats = RetirerStats()

    @classmethod
    def from_settings(cls, settings: Settings, client: Client, store: OrderStore) -> Retirer:
        """A Retirer configured by the ``[retirer]`` section."""
        r = settings.retirer
        return cls(
            client, store, interval_s=r.interval_s, grace_s=r.grace_s, batch_size=r.batch_size
        )

    async def retire_once(self) -> int:
        """One pass over every activity; returns how many order records left Redis."""
        try:
            seconds, micros = await self.client.time()
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        # "due" is decided on Redis time, the clock the scripts stamped the queue with
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        removed = 0
        for activity_id in await key_spaces(self.client):  # the buckets' orders retire too
            removed += await self._retire_activity(activity_id, now_ms)
        self.stats.passes += 1
        return removed

    async def _retire_activity(self, activity_id: str, now_ms: int) -> int:
        cutoff_ms = now_ms - int(self.grace_s * 1000)
        requeue_before_ms = now_ms - int(self.requeue_after_s * 1000)
        removed = 0
        offset = 0
        for _ in range(self.max_batches):
            try:
                raw: Any = await self.client.zrangebyscore(
                    keys.retiring(activity_id), "-inf", cutoff_ms, start=offset, num=self.batch_size
                )
            except CONNECTION_ERRORS as exc:
                raise RedisUnavailable() from exc
            ids = [m.decode() for m in raw]
            if not ids:
                break
            stored = await self.store.statuses_of(ids)
            args: list[str | int] = [requeue_before_ms, now_ms]
            for order_id in ids:
                args += [order_id, stored.get(order_id, "")]
            reply = await self.scripts.retire_orders(
                self.client, keys.retire_keys(activity_id), args
            )
            removed += int(reply[0])
            # counted as they leave: a pass that fails further on has still removed these
            self.stats.retired += int(reply[0])
            if len(ids) < self.batch_size or int(reply[0]) == 0:
                # the rest is newer than what the store has not caught up with yet: next pass
                break
            # the ones the store has not caught up with stay queued: look past them
            offset += len(ids) - int(reply[1])
        return removed

    async def run(self, stop: asyncio.Event) -> None:
        """Retire every ``interval_s`` until ``stop`` is set; ordinary faults never end it."""
        failing = False
        while not stop.is_set():
            try:
                count = await self.retire_once()
                if count:
                    log.debug("retired %d ended orders from Redis", count)
                if failing:
                    log.info("retirer working again")
                failing = False
            except (  # type: ignore[misc]
                RedisUnavailable,
                StoreUnavailable,
                redis_errors.RedisError,
                *CONNECTION_ERRORS,
            ) as exc:
                self.stats.failures += 1
                if not failing:
                    log.warning(
                        "retirer pass failed (%r); retrying every %.1fs", exc, self.interval_s
                    )
                failing = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
