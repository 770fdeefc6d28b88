"""After the purchase, with a payment provider: confirm, settle at the deadline, reconcile, refund.

Three background jobs and one shared step, all speaking PaymentProvider and changing orders
only through the Lua scripts (confirm_payment.lua, release_stock.lua, refund_update.lua):

- ``confirm``: a verified "paid" (notification, or the provider's answer to a query) goes
  through the same atomic step as the generic callback, keyed by the provider's transaction id,
  so a notification, its retries and a query confirm one payment once.
- ``DeadlineSettler``: the sweeper hands it every due order that has a prepay. It asks the
  provider (deadline.py: query, close, query), then confirms (paid in time) or releases (closed
  unpaid). One task per order, bounded in number, so a slow provider never blocks other
  expiries; a RETRY keeps the stock held and is asked again with backoff, and an order held
  past ``hold_ceiling_s`` is counted and logged for ops.
- ``Reconciler``: asks about prepaid orders that stay quiet (主动查单): a reserved order paid
  whose notification was lost becomes paid; an order cancelled with a prepay is closed at the
  provider, and a payment that slipped through anyway is confirmed (refund_required: refunded).
- ``Refunder``: every refund_required payment is refunded with a refund number derived from the
  order, so a retry after a timeout or a crash is the same refund, never a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime

from redis import exceptions as redis_errors

from seckill.errors import RedisUnavailable, SeckillError
from seckill.orders.store import StoreUnavailable
from seckill.payments.deadline import Verdict, backoff_s, settle_at_deadline
from seckill.payments.ledger import Ledger, RefundRecord
from seckill.payments.provider import (
    PaymentProvider,
    ProviderRefused,
    ProviderUnavailable,
    QueryResult,
    RefundNotice,
    RefundRequest,
)
from seckill.payments.refunds import RefundStep, RefundVerdict, follow_up, refund_step, verdict_of
from seckill.scripts import CONNECTION_ERRORS
from seckill.stock import Payment, Release, RetiredLookup, Stock, payment_hash

log = logging.getLogger(__name__)

PROVIDER = "wechatpay"
REFUND_REASON = "秒杀订单已结束，退回货款"  # shown to the payer: the flash-sale order had ended

# what "our side is away" looks like to a background job: skip, try again later
FAULTS: tuple[type[BaseException], ...] = (
    RedisUnavailable,
    redis_errors.RedisError,
    StoreUnavailable,
    SeckillError,
    *CONNECTION_ERRORS,
)


def success_ms(text: str | None) -> int:
    """A provider's RFC 3339 time (``2026-11-25T18:00:01+08:00``) as epoch ms; 0 if none."""
    if not text:
        return 0
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return 0
    if moment.tzinfo is None:
        return 0
    return int(moment.timestamp() * 1000)


async def confirm(
    stock: Stock,
    ledger: Ledger,
    retired: RetiredLookup | None,
    order_id: str,
    transaction_id: str,
    amount_cents: int,
    success_time: str | None,
) -> Payment:
    """A verified payment through confirm_payment.lua, once per transaction id.

    Anything but paid / refund_required / ignored is kept as suspicious: the money was taken
    and the order does not take it (wrong amount, unknown order, a reused transaction id).
    """
    payment = await stock.pay(
        order_id,
        transaction_id,
        amount_cents,
        True,
        payment_hash(transaction_id, order_id, amount_cents, True),
        provider=PROVIDER,
        retired=retired,
        paid_at_ms=success_ms(success_time),
    )
    if payment in (Payment.AMOUNT_MISMATCH, Payment.NOT_FOUND, Payment.CONFLICT):
        log.error(
            "payment %s for order %s not applied (%s): kept for ops",
            transaction_id,
            order_id,
            payment.value,
        )
        await ledger.suspicious(
            payment.value,
            provider=PROVIDER,
            order_id=order_id,
            transaction_id=transaction_id,
            amount_cents=amount_cents,
        )
    return payment


async def confirm_query(
    stock: Stock, ledger: Ledger, retired: RetiredLookup | None, query: QueryResult
) -> Payment | None:
    """Confirm what a query says was paid; None when the answer cannot be believed as ours."""
    if not query.for_us or not query.transaction_id or query.amount_total is None:
        log.error("query of order %s answered a payment not for us: kept", query.order_id)
        await ledger.suspicious(
            "not_our_merchant" if not query.for_us else "incomplete_query",
            provider=PROVIDER,
            order_id=query.order_id,
            transaction_id=query.transaction_id,
            amount_cents=query.amount_total,
            mchid=query.mchid,
            appid=query.appid,
        )
        return None
    return await confirm(
        stock,
        ledger,
        retired,
        query.order_id,
        query.transaction_id,
        query.amount_total,
        query.success_time,
    )


@dataclasses.dataclass(slots=True)
class _Held:
    attempts: int
    next_at: float  # monotonic
    since: float  # monotonic: first offered (about the deadline)
    alerted: bool = False


@dataclasses.dataclass(slots=True)
class SettlerStats:
    paid: int = 0  # paid in time, confirmed through the provider's answer
    released: int = 0  # closed unpaid, then released
    retries: int = 0  # the provider did not say: asked again later


@dataclasses.dataclass(frozen=True, slots=True)
class Books:
    """What every payment loop works on: the stock in Redis, the payment ledger, the provider,
    and where orders retired from Redis are looked up."""

    stock: Stock
    ledger: Ledger
    provider: PaymentProvider
    retired: RetiredLookup | None


class _PaymentLoop:
    def __init__(self, books: Books) -> None:
        self.stock = books.stock
        self.ledger = books.ledger
        self.provider = books.provider
        self.retired = books.retired


class DeadlineSettler(_PaymentLoop):
    """Due orders with a prepay: the provider decides, one bounded task per order."""

    def __init__(
        self,
        books: Books,
        *,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        hold_ceiling_s: float = 600.0,
        concurrency: int = 16,
    ) -> None:
        super().__init__(books)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.hold_ceiling_s = hold_ceiling_s
        self.stats = SettlerStats()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._held: dict[str, _Held] = {}

    def busy(self, order_id: str) -> bool:
        """True while the order is being settled or waits for its next try."""
        if order_id in self._tasks:
            return True
        held = self._held.get(order_id)
        return held is not None and time.monotonic() < held.next_at

    def offer(self, order_id: str) -> None:
        """Settle a due prepaid order in the background, unless it is already on its way."""
        if self.busy(order_id):
            return
        task = asyncio.get_running_loop().create_task(self._settle(order_id))
        self._tasks[order_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(order_id, None))

    def held(self) -> int:
        """Orders whose stock stays held because the provider has not answered yet."""
        return len(self._held)

    def over_ceiling(self) -> int:
        """Of those, how many have waited longer than ``hold_ceiling_s``."""
        now = time.monotonic()
        return sum(1 for h in self._held.values() if now - h.since > self.hold_ceiling_s)

    async def close(self) -> None:
        """Stop every settling task (each is idempotent: another pass redoes it)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)

    async def _settle(self, order_id: str) -> None:
        async with self._slots:
            try:
                done = await self._decide(order_id)
            except FAULTS as exc:
                log.warning("settling order %s at its deadline failed: %r", order_id, exc)
                done = False
        if done:
            self._held.pop(order_id, None)
            return
        self.stats.retries += 1
        now = time.monotonic()
        held = self._held.setdefault(order_id, _Held(0, now, now))
        held.attempts += 1
        held.next_at = now + backoff_s(
            held.attempts, base_s=self.backoff_base_s, cap_s=self.backoff_max_s
        )
        if not held.alerted and now - held.since > self.hold_ceiling_s:
            held.alerted = True
            log.error(
                "order %s: the payment provider has not settled it %.0fs after its deadline; "
                "its stock stays held until it answers",
                order_id,
                now - held.since,
            )

    async def _decide(self, order_id: str) -> bool:
        """True once the order is settled (paid or released); False: ask again later."""
        settlement = await settle_at_deadline(self.provider, order_id)
        if settlement.verdict is Verdict.PAID:
            assert settlement.query is not None
            payment = await confirm_query(self.stock, self.ledger, self.retired, settlement.query)
            if payment is Payment.PAID:
                self.stats.paid += 1
                log.info("order %s paid before its deadline (%s)", order_id, settlement.reason)
                await self.ledger.forget_prepay(order_id)
            if payment is Payment.REFUND_REQUIRED:
                # paid, but not in time by the provider's own clock (or the order had ended):
                # the refunder gives the money back, and a still reserved order expires now
                outcome = await self.stock.release(order_id, "expired", settled=True)
                self.stats.released += outcome is Release.RELEASED
            return payment in (Payment.PAID, Payment.REFUND_REQUIRED)
        if settlement.verdict is Verdict.UNPAID:
            outcome = await self.stock.release(order_id, "expired", settled=True)
            if outcome is Release.RELEASED:
                self.stats.released += 1
            # not reserved any more (paid by a notification meanwhile, or cancelled): settled
            return outcome is not Release.NOT_DUE
        log.info("order %s not settled yet: %s", order_id, settlement.reason)
        return False


@dataclasses.dataclass(slots=True)
class ReconcilerStats:
    queries: int = 0
    confirmed: int = 0  # payments found by asking (their notification was lost or late)
    closed: int = 0  # provider orders of cancelled orders closed
    passes: int = 0


class Reconciler(_PaymentLoop):
    """Asks the provider about prepaid orders that stay quiet, so a lost callback loses nothing."""

    def __init__(
        self,
        books: Books,
        *,
        interval_s: float = 30.0,
        quiet_s: float = 60.0,
        per_pass: int = 200,
    ) -> None:
        super().__init__(books)
        self.interval_s = interval_s
        self.quiet_ms = int(quiet_s * 1000)
        self.per_pass = per_pass
        self.stats = ReconcilerStats()
        self._asked: dict[str, int] = {}  # order id -> when it was last asked about (ms)

    async def reconcile(self) -> int:
        """One pass over every activity's prepays; how many provider calls it made."""
        budget = self.per_pass
        now_ms = await self.stock.redis_now_ms()
        for activity_id in await self.stock.spaces():
            cursor = 0
            while budget > 0:
                cursor, records = await self.ledger.scan_prepays(activity_id, cursor, 100)
                for record in records:
                    if budget <= 0:
                        break
                    budget -= await self._one(record.order_id, record.at_ms, now_ms)
                if cursor == 0:
                    break
        if len(self._asked) > 100_000:
            self._asked.clear()
        self.stats.passes += 1
        return self.per_pass - budget

    async def _status(self, order_id: str) -> tuple[str, int] | None:
        record = await self.stock.order(order_id)
        if record is None and self.retired is not None:
            record = await self.retired(order_id)
        return None if record is None else (record.status, record.expires_at_ms)

    async def _one(self, order_id: str, prepaid_at_ms: int, now_ms: int) -> int:
        """Look at one prepaid order; the number of provider calls made (0 or more)."""
        found = await self._status(order_id)
        if found is None:
            return 0  # not written anywhere yet: next pass
        status, expires_at_ms = found
        if status == "paid":
            await self.ledger.forget_prepay(order_id)
            return 0
        quiet = now_ms - max(prepaid_at_ms, self._asked.get(order_id, 0)) >= self.quiet_ms
        if not quiet:
            return 0
        if status == "reserved" and now_ms >= expires_at_ms:
            return 0  # due: the sweeper's settler decides it
        self._asked[order_id] = now_ms
        self.stats.queries += 1
        try:
            query = await self.provider.query(order_id)
        except ProviderUnavailable as exc:
            log.info("reconciler: query of %s failed: %s", order_id, exc)
            return 1
        except ProviderRefused as exc:
            if status != "reserved" and exc.code in ("ORDER_NOT_EXIST", "RESOURCE_NOT_EXISTS"):
                await self.ledger.forget_prepay(order_id)
            return 1
        if query.paid:
            payment = await confirm_query(self.stock, self.ledger, self.retired, query)
            if payment in (Payment.PAID, Payment.REFUND_REQUIRED):
                self.stats.confirmed += 1
                log.info("reconciler: order %s was paid (%s)", order_id, payment.value)
                await self.ledger.forget_prepay(order_id)
            return 1
        if status == "reserved":
            return 1  # not paid yet, still within its deadline: nothing to do
        if query.settled:
            await self.ledger.forget_prepay(order_id)
            return 1
        # cancelled (or expired) here, still payable there: close it so nobody pays for nothing
        try:
            await self.provider.close_order(order_id)
            self.stats.closed += 1
        except (ProviderUnavailable, ProviderRefused) as exc:
            log.info("reconciler: close of %s failed: %s", order_id, exc)
        return 2

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every ``interval_s`` until ``stop``; our own faults only skip a pass."""
        while not stop.is_set():
            try:
                await self.reconcile()
            except FAULTS as exc:
                log.warning("reconciler pass failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)


@dataclasses.dataclass(slots=True)
class RefunderStats:
    requested: int = 0  # refund calls made (first tries and retries)
    refunded: int = 0
    retries: int = 0
    attention: int = 0


class Refunder(_PaymentLoop):
    """Refunds every refund_required payment, once, whatever fails on the way."""

    def __init__(
        self,
        books: Books,
        refund_number: Callable[[str], str],
        *,
        interval_s: float = 1.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        follow_up_s: float = 60.0,
        batch: int = 50,
    ) -> None:
        super().__init__(books)
        self.refund_number = refund_number
        self.interval_s = interval_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.follow_up_ms = int(follow_up_s * 1000)
        self.batch = batch
        self.stats = RefunderStats()

    async def refund_pass(self) -> int:
        """Try every refund that is due; how many were tried."""
        tried = 0
        now_ms = await self.stock.redis_now_ms()
        for activity_id in await self.stock.spaces():
            for order_id in await self.ledger.refunds_due(activity_id, now_ms, self.batch):
                record = await self.ledger.refund(order_id)
                if record is None or record.status not in ("pending", "processing"):
                    continue
                await self.step(record, now_ms)
                tried += 1
        return tried

    async def step(self, record: RefundRecord, now_ms: int) -> RefundRecord:
        """Ask for (or about) one refund and store what the answer means."""
        number = record.out_refund_no or self.refund_number(record.order_id)
        await self.ledger.remember_refund_number(number, record.order_id)
        self.stats.requested += 1
        step: RefundStep
        if record.status == "processing":
            step = await follow_up(self.provider, number)
        else:
            step = await refund_step(
                self.provider,
                RefundRequest(
                    order_id=record.order_id,
                    out_refund_no=number,
                    amount_refund=record.amount_cents,
                    amount_total=record.amount_cents,
                    reason=REFUND_REASON,
                ),
            )
        refund_id = step.result.refund_id if step.result is not None else record.refund_id
        if step.verdict is RefundVerdict.RETRY:
            self.stats.retries += 1
            attempts = record.attempts + 1
            after = record.moved(attempts=attempts, out_refund_no=number, reason=step.reason)
            wait_s = backoff_s(attempts, base_s=self.backoff_base_s, cap_s=self.backoff_max_s)
            next_at = now_ms + int(wait_s * 1000)
        else:
            status = {
                RefundVerdict.REFUNDED: "refunded",
                RefundVerdict.PENDING: "processing",
                RefundVerdict.ATTENTION: "attention",
            }[step.verdict]
            after = record.moved(
                status=status, out_refund_no=number, refund_id=refund_id, reason=step.reason
            )
            next_at = now_ms + self.follow_up_ms if status == "processing" else -1
            if status == "refunded":
                self.stats.refunded += 1
            if status == "attention":
                self.stats.attention += 1
                log.error("refund of order %s needs a person: %s", record.order_id, step.reason)
        await self.ledger.move_refund(record, after, next_at)
        return after

    async def on_notice(self, notice: RefundNotice) -> bool:
        """Apply a verified refund notification; False when no refund of ours matches it."""
        order_id = await self.ledger.order_of_refund_number(notice.out_refund_no)
        order_id = order_id or notice.order_id
        if order_id is None:
            return False
        for _ in range(3):  # compare-and-set: a refunder moving it meanwhile means read again
            record = await self.ledger.refund(order_id)
            if record is None:
                return False
            verdict = verdict_of(notice.refund_status)
            status = {
                RefundVerdict.REFUNDED: "refunded",
                RefundVerdict.PENDING: "processing",
            }.get(verdict, "attention")
            if record.status == status or record.status == "refunded":
                return True
            after = record.moved(
                status=status,
                out_refund_no=notice.out_refund_no,
                refund_id=notice.refund_id or record.refund_id,
                reason=f"notification {notice.event_type}",
            )
            if status == "attention":
                log.error("refund of order %s: %s", order_id, notice.event_type)
            next_at = (await self.stock.redis_now_ms()) + self.follow_up_ms
            if await self.ledger.move_refund(
                record, after, next_at if status == "processing" else -1
            ):
                return True
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Refund every ``interval_s`` until ``stop``; our own faults only skip a pass."""
        while not stop.is_set():
            try:
                await self.refund_pass()
            except FAULTS as exc:
                log.warning("refunder pass failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
