"""Typed application state: everything a handler may use, under one AppKey."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from seckill.auth import AdminAuth, PaymentSignature, UserAuth
from seckill.breakers import AsyncBreaker
from seckill.catalog import Catalog
from seckill.connections import Client
from seckill.events import Events
from seckill.limits import Rules
from seckill.lottery import Lottery
from seckill.metrics import Metrics, Shared
from seckill.orders.store import OrderStore
from seckill.personal import Sealer
from seckill.risk import Risk
from seckill.scripts import Scripts
from seckill.settings import Settings
from seckill.stock import Stock
from seckill.switches import Switches
from seckill.turns import Turns
from seckill.upstreams import Upstream

if TYPE_CHECKING:
    from seckill.payments.wechatpay import WechatPay
    from seckill.web.live import Live


@dataclass(slots=True)
class Services:
    settings: Settings
    redis: Client
    scripts: Scripts
    stock: Stock
    catalog: Catalog
    switches: Switches
    events: Events
    redis_breaker: AsyncBreaker
    limits: Rules
    risk: Risk
    upstreams: dict[str, Upstream]
    users: UserAuth
    admin: AdminAuth
    payments: PaymentSignature
    store: OrderStore
    metrics: Metrics
    lottery: Lottery
    turns: Turns
    openapi: dict[str, Any] = field(default_factory=dict)
    # requests whose handler has started and not answered yet (graceful drain, load shedding)
    in_flight: int = 0
    # set on SIGTERM: answers carry "Connection: close" while in-flight requests finish
    draining: bool = False
    shed: int = 0
    http: aiohttp.ClientSession | None = None
    shared_metrics: Shared | None = None
    # `seckill up`: which background loops (writer, sweeper) run in this process right now
    loops: Callable[[], dict[str, bool]] | None = None
    # requests waiting for the rest of their body (not in flight; the drain waits for them)
    receiving: int = 0
    # /readyz's Redis probe (one at a time) and when it finished: its answer serves a second
    ready_probe: asyncio.Future[str | None] | None = None  # None: ready, else why not
    ready_checked_at: float = -1e9
    # seals and opens addresses on orders; None: no data key (orders with an address refused)
    personal: Sealer | None = None
    # every circuit breaker of this process, for the console (the writer's joins it in `up`)
    breakers: list[AsyncBreaker] = field(default_factory=list)
    # the console's live snapshot: computed once a second only while a console watches
    live: Live | None = None
    # WeChat Pay (SECKILL_WECHATPAY_*, or the local one of `up --fake-wechatpay`); None: off
    wechatpay: WechatPay | None = None


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
