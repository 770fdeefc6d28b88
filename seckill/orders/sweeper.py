"""The expiry sweeper: unpaid reservations past their deadline go back on sale.

Safe in several processes at once: release_stock.lua re-checks status and deadline
atomically, so two sweepers racing for one order release it exactly once, and a payment
racing its expiry ends in exactly one of paid or expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from seckill import clock
from seckill.errors import RedisUnavailable
from seckill.scripts import CONNECTION_ERRORS
from seckill.stock import Release, Stock

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SweeperStats:
    expired: int = 0
    passes: int = 0


class Sweeper:
    def __init__(self, stock: Stock, *, interval_s: float = 0.5, batch_size: int = 200) -> None:
        self.stock = stock
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.stats = SweeperStats()

    async def sweep(self) -> int:
        """One pass over every activity; returns how many orders expired."""
        expired = 0
        now = clock.now_ms()
        for activity_id in await self.stock.activity_ids():
            while True:
                due = await self.stock.due(activity_id, now, self.batch_size)
                for order_id in due:
                    outcome = await self.stock.release(order_id, "expired")
                    if outcome is Release.RELEASED:
                        expired += 1
                    elif outcome is Release.NOT_CANCELLABLE or outcome is Release.NOT_FOUND:
                        # paid or cancelled meanwhile: its deadline entry is stale
                        await self.stock.forget_deadline(activity_id, order_id)
                if len(due) < self.batch_size:
                    break
        self.stats.expired += expired
        self.stats.passes += 1
        return expired

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                count = await self.sweep()
                if count:
                    log.info("expired %d unpaid reservations", count)
            except (RedisUnavailable, *CONNECTION_ERRORS):  # type: ignore[misc]
                log.warning("Redis unreachable; the sweeper retries")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
