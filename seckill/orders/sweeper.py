"""The expiry sweeper: unpaid reservations past their deadline go back on sale.

Safe in several processes at once: release_stock.lua re-checks status and deadline
atomically, so two sweepers racing for one order release it exactly once, and a payment
racing its expiry ends in exactly one of paid or expired.

"Due" is decided by Redis's clock, never this machine's: the script checks the deadline by
Redis TIME, so a sweeper whose clock runs ahead would call it for orders that are not due yet
(each call answering not_due), and one whose clock lags would expire orders late. One TIME per
pass keeps both in step.

A due order with a prepay (a payment order placed with WeChat Pay) is not released here:
release_stock.lua answers ``prepaid`` and the order goes to the DeadlineSettler
(seckill/payments/settlement.py), which asks the provider in a task of its own, so a slow or
unreachable provider never delays the other expiries. Its stock stays held meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis import exceptions as redis_errors

from seckill.buckets import activity_of_space
from seckill.errors import RedisUnavailable
from seckill.scripts import CONNECTION_ERRORS
from seckill.stock import Release, Stock

if TYPE_CHECKING:
    from seckill.payments.settlement import DeadlineSettler

log = logging.getLogger(__name__)

_REDIS_FAULTS: tuple[type[BaseException], ...] = (
    RedisUnavailable,
    redis_errors.RedisError,
    *CONNECTION_ERRORS,
)


@dataclass(slots=True)
class SweeperStats:
    expired: int = 0
    passes: int = 0
    calls: int = 0  # release_stock.lua calls, due or not
    failed_passes: int = 0
    prepaid: int = 0  # due orders handed to the payment provider's settler
    moves_finished: int = 0  # stock moves between buckets that their mover left unfinished


class Sweeper:
    def __init__(
        self,
        stock: Stock,
        *,
        interval_s: float = 0.5,
        batch_size: int = 200,
        settler: DeadlineSettler | None = None,
    ) -> None:
        self.stock = stock
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.settler = settler
        self.stats = SweeperStats()
        self._unsettled_logged = False

    async def sweep(self) -> int:
        """One pass over every activity and bucket; returns how many orders expired.

        A bucket's stock moves cut short (their mover crashed) are finished here too.
        """
        expired = 0
        now = await self.stock.redis_now_ms()
        spaces = await self.stock.spaces()
        # bucket 0 of a bucketed activity is the activity's own space: known by its buckets
        bucketed = {activity_of_space(s) for s in spaces if s != activity_of_space(s)}
        for activity_id in spaces:
            if activity_of_space(activity_id) in bucketed:
                self.stats.moves_finished += await self.stock.buckets.recover(activity_id, now)
            held = 0  # due entries that stay (prepaid: the provider decides), skipped by offset
            while True:
                due = await self.stock.due(activity_id, now, self.batch_size, held)
                for order_id in due:
                    if self.settler is not None and self.settler.busy(order_id):
                        held += 1
                        continue
                    self.stats.calls += 1
                    outcome = await self.stock.release(order_id, "expired")
                    if outcome is Release.RELEASED:
                        expired += 1
                    elif outcome is Release.NOT_CANCELLABLE or outcome is Release.NOT_FOUND:
                        # paid or cancelled meanwhile: its deadline entry is stale
                        await self.stock.forget_deadline(activity_id, order_id)
                    elif outcome is Release.PREPAID:
                        held += 1
                        self._prepaid(order_id)
                if len(due) < self.batch_size:
                    break
        self.stats.expired += expired
        self.stats.passes += 1
        return expired

    def _prepaid(self, order_id: str) -> None:
        self.stats.prepaid += 1
        if self.settler is not None:
            self.settler.offer(order_id)
        elif not self._unsettled_logged:
            # a prepay from when WeChat Pay was configured: held until it is configured again
            self._unsettled_logged = True
            log.error(
                "order %s has a prepay but no payment provider is configured here; "
                "its stock stays held (configure SECKILL_WECHATPAY_*)",
                order_id,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval_s`` until ``stop`` is set; Redis faults only skip a pass."""
        try:
            await self._run(stop)
        finally:
            if self.settler is not None:
                await self.settler.close()

    async def _run(self, stop: asyncio.Event) -> None:
        failing: str | None = None
        while not stop.is_set():
            try:
                count = await self.sweep()
                if failing is not None:
                    log.info("the sweeper reaches Redis again")
                    failing = None
                if count:
                    log.info("expired %d unpaid reservations", count)
            except _REDIS_FAULTS as exc:
                # an error reply (READONLY, OOM, MISCONF, NOREPLICAS …) or a lost connection:
                # say it once per kind, then keep trying every interval
                self.stats.failed_passes += 1
                kind = _kind(exc)
                if kind != failing:
                    log.warning(
                        "sweeper pass failed (%s); retrying every %.1fs", kind, self.interval_s
                    )
                    failing = kind
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)


def _kind(exc: BaseException) -> str:
    """A short name of a Redis fault: the error reply's first word, or the exception type."""
    cause = exc.__cause__ if isinstance(exc, RedisUnavailable) and exc.__cause__ else exc
    if isinstance(cause, redis_errors.ResponseError) and str(cause):
        return str(cause).split()[0]
    return type(cause).__name__
