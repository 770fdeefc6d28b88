"""Operational endpoints: liveness, readiness, metrics, the OpenAPI description.

The probes (/healthz, /readyz, /metrics) are served on the public port, or, with
``[server] ops_port``, only on a separate internal listener (app.create_ops_app).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from seckill.scripts import CONNECTION_ERRORS
from seckill.web.middlewares import error_response
from seckill.web.state import SERVICES, Services

routes = web.RouteTableDef()
probes = web.RouteTableDef()

# a probe storm (or a scrape per second from each of many pollers) costs Redis at most this
_READY_CACHE_S = 1.0


@probes.get("/healthz", name="healthz")
async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def ready(services: Services) -> str | None:
    """None when Redis answers and holds every script (and, with durability "replicated",
    has a replica), else why not; one probe at a time, a "ready" kept a second.

    A "not ready" is not kept: the next caller probes again (still one probe at a time), so
    readiness comes back the moment Redis does.
    """
    probe = services.ready_probe
    stale = time.monotonic() - services.ready_checked_at >= _READY_CACHE_S
    if probe is None or (probe.done() and (stale or probe.result() is not None)):
        probe = services.ready_probe = asyncio.ensure_future(_probe(services))
    # shielded: a caller that goes away does not cancel the probe the others wait on
    return await asyncio.shield(probe)


async def _probe(services: Services) -> str | None:
    answer: str | None = None
    try:
        await services.redis.ping()
        if not await services.scripts.loaded(services.redis):
            await services.scripts.load(services.redis)
        if services.settings.redis.replica_wait is not None:
            answer = await _replica_missing(services)
    except CONNECTION_ERRORS:
        answer = "Redis is unreachable"
    services.ready_checked_at = time.monotonic()
    return answer


async def _replica_missing(services: Services) -> str | None:
    """Why purchases cannot be confirmed by a replica now, or None (INFO replication)."""
    info: Any = await services.redis.info("replication")
    if info.get("role") != "master":
        return "Redis is a replica (durability = replicated needs the primary)"
    if int(info.get("connected_slaves", 0)) < 1:
        return "no replica connected: durability = replicated answers purchases 503"
    return None


@probes.get("/readyz", name="readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: Redis answers and holds every script (checked at most once a second)."""
    services = request.app[SERVICES]
    why = await ready(services)
    if why is not None:
        return error_response(503, "overloaded", f"not ready: {why}")
    down = sorted(
        name for name, up in (services.loops() if services.loops else {}).items() if not up
    )
    if down:
        # `seckill up` without its writer or sweeper would accept orders nobody persists
        return error_response(503, "overloaded", f"not ready: {' and '.join(down)} not running")
    return web.json_response({"status": "ready"})


@probes.get("/metrics", name="metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    services = request.app[SERVICES]
    shared = services.shared_metrics
    body = shared.render() if shared is not None else services.metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


@routes.get("/openapi.json", name="openapi")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI description of every endpoint."""
    return web.json_response(request.app[SERVICES].openapi)
