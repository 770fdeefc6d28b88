"""The gateway application factory (reused by the tests and by `seckill serve`/`up`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from seckill import connections, resources
from seckill.auth import AdminAuth, PaymentSignature, UserAuth
from seckill.breakers import STATES, AsyncBreaker
from seckill.catalog import Catalog
from seckill.connections import Client
from seckill.denylist import DenyList
from seckill.errors import RedisUnavailable
from seckill.events import Events
from seckill.limits import Rules
from seckill.lottery import Lottery
from seckill.metrics import Metrics, Shared
from seckill.orders.store import StoreUnavailable, open_store
from seckill.personal import Sealer
from seckill.risk import Hashing, HitLog, Risk, RulesFile, hash_key
from seckill.scripts import CONNECTION_ERRORS, Coalescer, Scripts
from seckill.settings import Settings
from seckill.stock import Stock
from seckill.switches import Switches
from seckill.turns import Turns
from seckill.upstreams import Upstream
from seckill.web import admin, console, fair, lane, ops, payments, public
from seckill.web.live import Live
from seckill.web.middlewares import errors
from seckill.web.state import SERVICES, Services

log = logging.getLogger(__name__)


@functools.cache
def _openapi() -> dict[str, Any]:
    """docs/openapi.yaml, parsed once per process (by libyaml): served as is, never changed."""
    document: dict[str, Any] = yaml.load(
        resources.openapi_path().read_text(encoding="utf-8"),
        Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader),
    )
    return document


def redis_client(settings: Settings) -> Client:
    """The client for settings.redis.url (one node, a Cluster or a Sentinel primary)."""
    return connections.connect(settings.redis)


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    try:
        await services.scripts.load(services.redis)
    except CONNECTION_ERRORS:
        # not fatal: /readyz says 503 and scripts load on first NOSCRIPT once Redis is back
        log.warning("Redis unreachable at start; the gateway answers 503 until it is back")
    yield
    await services.stock.close()
    await connections.close(services.redis)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    # the purchase path never touches the database: reads (order lookups, reports) only
    try:
        await app[SERVICES].store.migrate()
    except StoreUnavailable as exc:
        log.warning("order store unavailable at start (%s); reports answer 503 until it is", exc)
    yield
    await app[SERVICES].store.close()


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    services.http = aiohttp.ClientSession()
    yield
    await services.http.close()


async def _live_ctx(app: web.Application) -> AsyncIterator[None]:
    """The console's snapshot loop runs only while a console watches; stopped at exit."""
    yield
    live = app[SERVICES].live
    if live is not None:
        await live.close()


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    """Events listener, catalog refresh, flag resync: closed and awaited (bounded) at exit."""
    services = app[SERVICES]
    risk = services.risk
    loops: tuple[Any, ...] = (
        services.events,
        services.catalog,
        services.switches,
        services.limits,
        risk.file,
        risk.deny,
        risk.hits,
    )
    if services.shared_metrics is not None:
        loops = (*loops, services.shared_metrics)
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    yield
    for loop in loops:
        loop.close()
    for task in tasks:
        task.cancel()
    # bounded: a shutdown must never hang on a background loop
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)


async def _wechatpay_ctx(app: web.Application) -> AsyncIterator[None]:
    """WeChat Pay's breaker in the metrics; its HTTP session closed at exit (set at start or
    once the gateway's own URL is known: `up --fake-wechatpay`)."""
    services = app[SERVICES]

    def state() -> dict[tuple[str, ...], float]:
        provider = services.wechatpay
        return (
            {} if provider is None else {(provider.breaker.name,): STATES[provider.breaker.state]}
        )

    services.metrics.readings.add(
        "seckill_breaker_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open",
        "gauge",
        ["breaker"],
        state,
    )
    yield
    if services.wechatpay is not None:
        await services.wechatpay.aclose()


def _sealer(settings: Settings) -> Sealer | None:
    data = settings.data
    return Sealer(data.keys, data.cipher, data.hash_key) if data.keys.strip() else None


def create_app(settings: Settings) -> web.Application:
    """The gateway for ``settings`` (settings.redis.url must point at a Redis)."""
    if not settings.redis.url:
        raise ValueError("create_app needs settings.redis.url")
    client = redis_client(settings)
    scripts = Scripts.from_dir()
    coalescer = Coalescer(
        client,
        max_batch=settings.redis.pipeline_max,
        in_flight=settings.redis.pipelines_in_flight,
        replica_wait_ms=settings.redis.replica_wait,
    )
    catalog = Catalog(
        client,
        scripts,
        refresh_interval_s=settings.purchase.refresh_interval_s,
        negative_cache_s=settings.purchase.negative_cache_s,
        backlog_ceiling=settings.writer.backlog_ceiling,
    )
    metrics = Metrics()
    metrics.readings.add(
        "seckill_stock_left",
        "Quantity still on sale, as this process last saw it",
        "gauge",
        ["activity"],
        lambda: {(k,): float(e.stock_left) for k, e in catalog.entries().items()},
    )
    metrics.readings.add(
        "seckill_sku_stock_left",
        "Quantity of each SKU still on sale, as this process last saw it",
        "gauge",
        ["activity", "sku"],
        lambda: {
            (k, sku): float(left)
            for k, e in catalog.entries().items()
            for sku, left in e.sku_left.items()
        },
    )
    metrics.readings.add(
        "seckill_activity_sold_out",
        "1 while this process answers sold_out without Redis",
        "gauge",
        ["activity"],
        lambda: {
            (k,): float(e.stock_left <= 0 and e.holders is not None)
            for k, e in catalog.entries().items()
        },
    )
    metrics.readings.add(
        "seckill_backlog_over_ceiling",
        "1 while order POST answers 503 overloaded: unwritten orders passed the backlog ceiling",
        "gauge",
        ["activity"],
        lambda: {(k,): float(e.over_ceiling) for k, e in catalog.entries().items()},
    )
    metrics.readings.add(
        "seckill_order_backlog",
        "Orders accepted and not yet written, as this process last read it (0: not read)",
        "gauge",
        ["activity"],
        lambda: {(k,): float(e.backlog) for k, e in catalog.entries().items()},
    )
    events = Events(client)
    catalog.listen(events)
    switches = Switches(
        client,
        scripts,
        resync_interval_s=settings.purchase.refresh_interval_s,
        coalescer=coalescer,
    )
    switches.listen(events)
    redis_breaker = AsyncBreaker(
        "redis",
        fail_max=settings.protection.redis_fail_max,
        reset_timeout_s=settings.protection.redis_reset_timeout_s,
        failures=(RedisUnavailable,),
    )
    u = settings.upstreams
    upstreams = {
        name: Upstream(
            name, url, timeout_s=u.timeout_s, fail_max=u.fail_max, reset_timeout_s=u.reset_timeout_s
        )
        for name, url in (("reviews", u.reviews_url), ("recommendations", u.recommendations_url))
    }
    breakers = [redis_breaker, *(upstream.breaker for upstream in upstreams.values())]
    metrics.readings.add(
        "seckill_breaker_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open",
        "gauge",
        ["breaker"],
        lambda: {(b.name,): STATES[b.state] for b in breakers},
    )
    metrics.readings.add(
        "seckill_breaker_transitions_total",
        "Circuit breaker state changes",
        "counter",
        ["breaker"],
        lambda: {(b.name,): float(b.transitions) for b in breakers},
    )
    metrics.readings.add(
        "seckill_upstream_fallbacks_total",
        "Non-core reads answered with the fallback (degraded: true)",
        "counter",
        ["upstream"],
        lambda: {(name,): float(up.fallbacks) for name, up in upstreams.items()},
    )
    metrics.readings.add(
        "seckill_flag_value",
        "Degradation flags as numbers (true 1, false 0)",
        "gauge",
        ["flag"],
        lambda: {
            (name,): float(value)
            for name, value in switches.all().items()
            if isinstance(value, bool | int | float)
        },
    )
    limits = Rules(
        Path(settings.limits.rules_path) if settings.limits.rules_path else resources.limits_path(),
        gateway_processes=settings.limits.gateway_processes,
    )
    metrics.readings.add(
        "seckill_limits_reload_errors_total",
        "Rate-limit rule files refused (the previous rules stayed in force)",
        "counter",
        [],
        lambda: {(): float(limits.reload_errors)},
    )
    metrics.readings.add(
        "seckill_rate_limited_total",
        "Requests refused (or, in shadow mode, that would have been) by a rate limit",
        "counter",
        ["activity", "scope", "mode"],
        lambda: {(a, s, m): float(n) for (a, s, m), n in limits.refused.items()},
    )
    hashing = Hashing(hash_key(settings.risk.hash_key, settings.jwt.secret))
    deny = DenyList(
        client, scripts, hashing.hash, resync_interval_s=settings.purchase.refresh_interval_s
    )
    deny.listen(events)
    risk = Risk(
        scripts,
        coalescer,
        RulesFile(
            Path(settings.risk.rules_path) if settings.risk.rules_path else resources.risk_path()
        ),
        hashing,
        deny,
        HitLog(client),
        one_call=not connections.is_cluster(client),
    )
    metrics.readings.add(
        "seckill_risk_hits_total",
        "Requests a risk rule refused (mode enforced) or would have (mode shadow)",
        "counter",
        ["rule", "mode"],
        lambda: {(r, m): float(n) for (r, m), n in risk.hits.counts.items()},
    )
    metrics.readings.add(
        "seckill_risk_hits_unlisted_total",
        "Risk hits counted but left out of the hits listing (a storm, or Redis away)",
        "counter",
        [],
        lambda: {(): float(risk.hits.dropped)},
    )
    metrics.readings.add(
        "seckill_risk_reload_errors_total",
        "Risk rule files refused (the previous rules stayed in force)",
        "counter",
        [],
        lambda: {(): float(risk.file.reload_errors)},
    )
    services = Services(
        settings=settings,
        upstreams=upstreams,
        limits=limits,
        risk=risk,
        redis_breaker=redis_breaker,
        switches=switches,
        events=events,
        redis=client,
        scripts=scripts,
        stock=Stock(client, scripts, coalescer, settings.purchase.idempotency_ttl_s),
        catalog=catalog,
        users=UserAuth(
            settings.jwt.secret,
            leeway_s=settings.jwt.leeway_s,
            max_lifetime_s=settings.jwt.max_lifetime_s,
        ),
        admin=AdminAuth(settings.admin.token),
        payments=PaymentSignature(settings.payment.secret, settings.payment.tolerance_s),
        store=open_store(settings.database_url),
        metrics=metrics,
        lottery=Lottery(client, scripts),
        turns=Turns(client, scripts),
        openapi=_openapi(),
        personal=_sealer(settings),
        breakers=breakers,
    )
    services.live = Live(services)
    app = web.Application(middlewares=[errors], client_max_size=1024 * 1024)
    app[SERVICES] = services
    if settings.server.metrics_dir:
        services.shared_metrics = Shared(Path(settings.server.metrics_dir), metrics)
    metrics.readings.add(
        "seckill_shed_total",
        "Requests refused at once because the process was at max_in_flight",
        "counter",
        [],
        lambda: {(): float(services.shed)},
    )
    metrics.readings.add(
        "seckill_in_flight",
        "Requests this process is working on",
        "gauge",
        [],
        lambda: {(): float(services.in_flight)},
    )
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_http_ctx)
    app.cleanup_ctx.append(_background_ctx)
    app.cleanup_ctx.append(_wechatpay_ctx)
    app.cleanup_ctx.append(_live_ctx)
    app.add_routes(public.routes)
    app.add_routes(payments.routes)
    app.add_routes(admin.routes)
    app.add_routes(fair.routes)
    app.add_routes(ops.routes)
    app.add_routes(console.routes)
    if not settings.server.ops_port:
        app.add_routes(ops.probes)  # else only on the internal listener (create_ops_app)
    lane.install(app)
    return app


def create_ops_app(services: Services) -> web.Application:
    """The internal listener's app: /healthz, /readyz, /metrics over the gateway's services."""
    app = web.Application()
    app[SERVICES] = services
    app.add_routes(ops.probes)
    return app
