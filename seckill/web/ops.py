"""Operational endpoints: liveness, readiness, metrics, the OpenAPI description."""

from __future__ import annotations

from aiohttp import web

from seckill.scripts import CONNECTION_ERRORS
from seckill.web.middlewares import error_response
from seckill.web.state import SERVICES

routes = web.RouteTableDef()


@routes.get("/healthz", name="healthz")
async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz", name="readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: Redis answers and holds every script."""
    services = request.app[SERVICES]
    try:
        await services.redis.ping()
        if not await services.scripts.loaded(services.redis):
            await services.scripts.load(services.redis)
    except CONNECTION_ERRORS:
        return error_response(503, "overloaded", "not ready: Redis is unreachable")
    down = sorted(
        name for name, up in (services.loops() if services.loops else {}).items() if not up
    )
    if down:
        # `seckill up` without its writer or sweeper would accept orders nobody persists
        return error_response(503, "overloaded", f"not ready: {' and '.join(down)} not running")
    return web.json_response({"status": "ready"})


@routes.get("/metrics", name="metrics")
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
