"""Admin endpoints (bearer SECKILL_ADMIN_TOKEN)."""

from __future__ import annotations

from aiohttp import web

from seckill import clock, keys, report
from seckill.activities import Activity
from seckill.errors import NotFound, Overloaded, RedisUnavailable
from seckill.orders.store import StoreUnavailable
from seckill.scripts import CONNECTION_ERRORS
from seckill.web.bodies import parse_json, read_limited
from seckill.web.state import SERVICES

routes = web.RouteTableDef()

_ADMIN_BODY_LIMIT = 64 * 1024


@routes.post("/admin/v1/activities", name="admin_activity_put")
async def put_activity(request: web.Request) -> web.Response:
    """Create an activity (or replace one not yet started) and warm its stock into Redis."""
    services = request.app[SERVICES]
    services.admin.check(request.headers.get("Authorization"))
    activity = Activity.from_request(parse_json(await read_limited(request, _ADMIN_BODY_LIMIT)))
    await services.stock.put_activity(activity)
    # the cache may still hold the replaced definition until the change event arrives
    entry = await services.catalog.reload(activity.id)
    if entry is None:  # deleted between the write and the read: report it honestly
        raise NotFound("activity vanished after creation")
    return web.json_response(entry.activity.admin(clock.now_ms(), entry.stock_left), status=201)


@routes.get("/admin/v1/activities/{activity_id}/report", name="admin_activity_report")
async def activity_report(request: web.Request) -> web.Response:
    """The invariant report: Redis and the store compared."""
    services = request.app[SERVICES]
    services.admin.check(request.headers.get("Authorization"))
    activity_id = request.match_info["activity_id"]
    if not keys.ID_PATTERN.fullmatch(activity_id):
        raise NotFound("no such activity")
    try:
        body = await report.build(services.redis, services.store, activity_id)
    except StoreUnavailable as exc:
        raise Overloaded("order store unavailable") from exc
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable() from exc
    if body is None:
        raise NotFound("no such activity")
    return web.json_response(body)
