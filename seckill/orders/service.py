"""The writer and the sweeper as one supervised background service (`writer`, `up`)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from seckill.connections import Client
from seckill.orders.fence import Fence
from seckill.orders.retirement import Retirer
from seckill.orders.store import OrderStore
from seckill.orders.supervisor import Supervisor
from seckill.orders.sweeper import Sweeper
from seckill.orders.writer import Writer, WriterConfig
from seckill.scripts import Coalescer, Scripts
from seckill.settings import Settings
from seckill.stock import Stock

if TYPE_CHECKING:
    from seckill.payments.settlement import DeadlineSettler, Reconciler, Refunder
    from seckill.payments.wechatpay import WechatPay

log = logging.getLogger(__name__)


class OrderService:
    """The order writer, the expiry sweeper and the retirer, sharing one client and one store.

    Each runs under its own Supervisor: a crash restarts it with backoff, and its heartbeat
    key tells the report and /readyz whether it is alive. The retirer removes ended orders from
    Redis once the store holds them, which is what keeps Redis's memory bounded.
    """

    def __init__(
        self,
        settings: Settings,
        client: Client,
        store: OrderStore,
        provider: WechatPay | None = None,
    ) -> None:
        w = settings.writer
        scripts = Scripts.from_dir()
        wait_ms = settings.redis.replica_wait
        self._fence = Fence(client, wait_ms, scripts) if wait_ms is not None else None
        self.writer = Writer(
            client,
            store,
            WriterConfig(
                batch_size=w.batch_size,
                block_ms=w.block_ms,
                max_rows_per_s=w.max_rows_per_s,
                claim_idle_ms=w.claim_idle_ms,
                retry_idle_ms=w.retry_idle_ms,
                max_deliveries=w.max_deliveries,
                trim_interval_s=w.trim_interval_s,
            ),
            consumer=w.consumer or None,
            fence=self._fence,
        )
        stock = self._stock = Stock(
            client,
            scripts,
            Coalescer(client, max_batch=64, in_flight=2),
            settings.purchase.idempotency_ttl_s,
        )
        self.settler: DeadlineSettler | None = None
        self.reconciler: Reconciler | None = None
        self.refunder: Refunder | None = None
        if provider is not None:
            self._payments(settings, client, scripts, stock, store, provider)
        self.sweeper = Sweeper(
            stock,
            interval_s=settings.sweeper.interval_s,
            batch_size=settings.sweeper.batch_size,
            settler=self.settler,
        )
        self.retirer = Retirer.from_settings(settings, client, store)
        self.supervisors = [
            Supervisor("writer", self.writer.run, client),
            Supervisor("sweeper", self.sweeper.run, client),
            Supervisor("retirer", self.retirer.run, client),
        ]
        if self.reconciler is not None and self.refunder is not None:
            self.supervisors += [
                Supervisor("reconciler", self.reconciler.run, client),
                Supervisor("refunder", self.refunder.run, client),
            ]

    def _payments(
        self,
        settings: Settings,
        client: Client,
        scripts: Scripts,
        stock: Stock,
        store: OrderStore,
        provider: WechatPay,
    ) -> None:
        """The loops that talk to WeChat Pay: deadline settler, reconciler, refunder."""
        from seckill.payments.ledger import Ledger
        from seckill.payments.settlement import Books, DeadlineSettler, Reconciler, Refunder
        from seckill.payments.wechatpay import out_refund_no_for

        p = settings.payment
        books = Books(stock, Ledger(client, scripts), provider, store.order)
        self.settler = DeadlineSettler(
            books,
            backoff_base_s=p.deadline_backoff_s,
            backoff_max_s=p.deadline_backoff_max_s,
            hold_ceiling_s=p.hold_ceiling_s,
        )
        self.reconciler = Reconciler(
            books,
            interval_s=p.reconcile_interval_s,
            quiet_s=p.reconcile_quiet_s,
        )
        self.refunder = Refunder(
            books,
            out_refund_no_for,
            interval_s=p.refund_interval_s,
            backoff_max_s=p.refund_backoff_max_s,
            follow_up_s=p.refund_follow_up_s,
        )

    def alive(self) -> dict[str, bool]:
        """Loop name -> whether it is running in this process now."""
        return {s.name: s.up for s in self.supervisors}

    async def run(self, stop: asyncio.Event, final_drain_s: float = 0.0) -> None:
        """Write and sweep until ``stop``; the writer finishes the batch in hand.

        ``final_drain_s`` > 0 then writes what is left, for at most that long (`seckill up`:
        one machine, so a clean stop should leave the database complete). Whatever remains
        stays in Redis and is written on the next start.
        """
        log.info("order writer %s started", self.writer.consumer)
        await asyncio.gather(*(s.run(stop) for s in self.supervisors))
        if final_drain_s > 0:
            try:
                await asyncio.wait_for(self.writer.drain(), final_drain_s)
            except TimeoutError:
                log.warning("backlog not fully written in %.1fs; it waits in Redis", final_drain_s)
            except Exception as exc:  # the stop must complete whatever Redis or the store say
                log.warning("final drain stopped early (%r); the rest waits in Redis", exc)
        await self._stock.close()
        if self._fence is not None:
            await self._fence.close()
        log.info("order writer %s stopped", self.writer.consumer)
