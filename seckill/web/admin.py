"""Admin endpoints (bearer SECKILL_ADMIN_TOKEN)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from seckill import buckets, clock, keys, report
from seckill.activities import Activity
from seckill.denylist import deny_body
from seckill.errors import InvalidRequest, NotFound, Overloaded, RedisUnavailable
from seckill.orders import deadletters
from seckill.orders.store import StoreUnavailable
from seckill.scripts import CONNECTION_ERRORS
from seckill.web.bodies import parse_json, read_limited
from seckill.web.state import SERVICES, Services

routes = web.RouteTableDef()

_ADMIN_BODY_LIMIT = 64 * 1024


@routes.post("/admin/v1/activities", name="admin_activity_put")
async def put_activity(request: web.Request) -> web.Response:
    """Create an activity (or replace one not yet started) and warm its stock into Redis."""
    services = _authorised(request)
    activity = Activity.from_request(parse_json(await read_limited(request, _ADMIN_BODY_LIMIT)))
    if activity.requires_address and services.personal is None:
        raise InvalidRequest("requires_address needs a data key (SECKILL_DATA_KEYS) on the gateway")
    await services.stock.put_activity(activity)
    # the cache may still hold the replaced definition until the change event arrives
    entry = await services.catalog.reload(activity.id)
    if entry is None:  # deleted between the write and the read: report it honestly
        raise NotFound("activity vanished after creation")
    body = entry.activity.admin(clock.now_ms(), entry.stock_left, sku_left=entry.sku_left)
    return web.json_response(body, status=201)


@routes.get("/admin/v1/activities", name="admin_activity_list")
async def list_activities(request: web.Request) -> web.Response:
    """Every activity's definition and live state, by id (?limit=, at most 1000)."""
    services = _authorised(request)
    limit = _page_limit(request)
    with _redis_answers():
        ids = await services.stock.activity_ids()
        pipe = services.redis.pipeline(transaction=False)
        for activity_id in ids[:limit]:
            pipe.hgetall(keys.meta(activity_id))
            pipe.get(keys.stock(activity_id))
            pipe.hgetall(keys.sku_stock(activity_id))
        replies = await pipe.execute()
    now_ms = clock.now_ms()
    listed = []
    for i in range(0, len(replies), 3):
        meta, stock, skus = replies[i : i + 3]
        if meta:
            activity = Activity.from_meta(meta)
            stock = await _stock_left(services, activity, stock)
            listed.append(_admin_body(activity, now_ms, stock, skus, services))
    return web.json_response({"count": len(ids), "activities": listed})


@routes.get(r"/admin/v1/activities/{activity_id:[^/]+}", name="admin_activity_get")
async def get_activity(request: web.Request) -> web.Response:
    """One activity's definition and live state (what the console edits)."""
    services = _authorised(request)
    activity_id = request.match_info["activity_id"]
    if not keys.ID_PATTERN.fullmatch(activity_id):
        raise NotFound("no such activity")
    with _redis_answers():
        pipe = services.redis.pipeline(transaction=False)
        pipe.hgetall(keys.meta(activity_id))
        pipe.get(keys.stock(activity_id))
        pipe.hgetall(keys.sku_stock(activity_id))
        meta, stock, skus = await pipe.execute()
    if not meta:
        raise NotFound("no such activity")
    activity = Activity.from_meta(meta)
    stock = await _stock_left(services, activity, stock)
    body = _admin_body(activity, clock.now_ms(), stock, skus, services)
    return web.json_response(body)


async def _stock_left(services: Services, activity: Activity, stock: Any) -> Any:
    """``stock`` as read (bucket 0's), or for a bucketed activity what all buckets hold."""
    if activity.buckets == 1:
        return stock
    return await services.stock.buckets.left(activity.id, activity.buckets)


def _admin_body(
    activity: Activity, now_ms: int, stock: Any, skus: Any, services: Services
) -> dict[str, Any]:
    paused = services.switches.value(f"activity.{activity.id}.paused") is True
    sku_left = {k.decode(): int(v) for k, v in skus.items()}
    return activity.admin(now_ms, int(stock or 0), paused, sku_left=sku_left)


@routes.get("/admin/v1/activities/{activity_id}/report", name="admin_activity_report")
async def activity_report(request: web.Request) -> web.Response:
    """The invariant report: Redis and the store compared."""
    services = _authorised(request)
    activity_id = request.match_info["activity_id"]
    if not keys.ID_PATTERN.fullmatch(activity_id):
        raise NotFound("no such activity")
    try:
        with _redis_answers():
            body = await report.build(services.redis, services.store, activity_id)
    except StoreUnavailable as exc:
        raise Overloaded("order store unavailable") from exc
    if body is None:
        raise NotFound("no such activity")
    return web.json_response(body)


@routes.get("/admin/v1/activities/{activity_id}/dead-letters", name="admin_dead_letters")
async def dead_letters(request: web.Request) -> web.Response:
    """The activity's dead letters: their count and the oldest ones (?limit=, at most 1000)."""
    services = _authorised(request)
    activity_id = request.match_info["activity_id"]
    if not keys.ID_PATTERN.fullmatch(activity_id):
        raise NotFound("no such activity")
    limit = _page_limit(request)
    with _redis_answers():
        known = await services.redis.exists(keys.meta(activity_id), keys.dead_letters(activity_id))
        if not known:
            raise NotFound("no such activity")
        count, page = 0, list[dict[str, Any]]()
        for space in await buckets.spaces_of(services.redis, activity_id):
            count += await deadletters.count(services.redis, space)
            if len(page) < limit:  # a bucketed activity's buckets in turn
                page += await deadletters.page(services.redis, space, limit - len(page))
    return web.json_response({"activity_id": activity_id, "count": count, "dead_letters": page})


def _page_limit(request: web.Request) -> int:
    """The ``?limit=`` of a listing (default 100, at most 1000); no other query parameter."""
    unknown = sorted(set(request.query) - {"limit"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter: {unknown[0]!r}")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise InvalidRequest("limit must be an integer") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be in 1..1000")
    return limit


@routes.get("/admin/v1/flags", name="admin_flags_list")
async def list_flags(request: web.Request) -> web.Response:
    """Every flag with its current value."""
    services = _authorised(request)
    return web.json_response({"flags": services.switches.all()})


@routes.put(r"/admin/v1/flags/{name:(?!audit$)[^/]+}", name="admin_flag_put")
async def put_flag(request: web.Request) -> web.Response:
    """Flip a flag, optionally for ttl_s seconds; audited, in effect everywhere within 1 s."""
    services = _authorised(request)
    body = parse_json(await read_limited(request, services.settings.server.max_body_bytes))
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = sorted(set(body) - {"value", "ttl_s"})
    if unknown:
        raise InvalidRequest(f"unknown field: {unknown[0]}")
    if "value" not in body:
        raise InvalidRequest("missing field: value")
    who = f"admin-api:{request.remote or 'unknown'}"
    with _redis_answers():
        answer = await services.switches.set(
            request.match_info["name"], body["value"], body.get("ttl_s"), who
        )
    return web.json_response(answer)


@routes.get("/admin/v1/flags/audit", name="admin_flags_audit")
async def flags_audit(request: web.Request) -> web.Response:
    """The most recent flag changes, newest first (?limit=, at most 1000)."""
    services = _authorised(request)
    limit = _page_limit(request)
    with _redis_answers():
        entries = await services.switches.audit(limit)
    return web.json_response({"entries": entries})


@routes.put("/admin/v1/risk/deny/{kind}/{value}", name="admin_risk_deny_put")
async def put_deny(request: web.Request) -> web.Response:
    """Deny a user, device or IP (for ttl_s seconds, or until deleted); audited."""
    services = _authorised(request)
    raw = await read_limited(request, services.settings.server.max_body_bytes)
    ttl_s, reason = deny_body(parse_json(raw) if raw.strip() else {})
    deny = services.risk.deny
    kind, value = request.match_info["kind"], request.match_info["value"]
    deny.member(kind, value)  # a bad kind or value is refused before Redis is asked
    with _redis_answers():
        answer = await deny.put(kind, value, ttl_s, reason, _who(request))
    return web.json_response(answer)


@routes.delete("/admin/v1/risk/deny/{kind}/{value}", name="admin_risk_deny_delete")
async def delete_deny(request: web.Request) -> web.Response:
    """Take a user, device or IP off the deny list; audited."""
    services = _authorised(request)
    deny = services.risk.deny
    kind, value = request.match_info["kind"], request.match_info["value"]
    deny.member(kind, value)
    with _redis_answers():
        answer = await deny.delete(kind, value, _who(request))
    return web.json_response(answer)


@routes.get("/admin/v1/risk/deny", name="admin_risk_deny_list")
async def list_deny(request: web.Request) -> web.Response:
    """Entries of the deny list in force, most recent first (?limit=, at most 1000)."""
    services = _authorised(request)
    limit = _page_limit(request)
    with _redis_answers():
        entries = await services.risk.deny.listing(limit)
    return web.json_response({"entries": entries})


@routes.get("/admin/v1/risk/audit", name="admin_risk_audit")
async def risk_audit(request: web.Request) -> web.Response:
    """The most recent deny-list changes, newest first (?limit=, at most 1000)."""
    services = _authorised(request)
    limit = _page_limit(request)
    with _redis_answers():
        entries = await services.risk.deny.audit(limit)
    return web.json_response({"entries": entries})


@routes.get("/admin/v1/risk/hits", name="admin_risk_hits")
async def risk_hits(request: web.Request) -> web.Response:
    """Recent risk-rule hits, newest first (?limit=, at most 1000), and the counts by rule."""
    services = _authorised(request)
    limit = _page_limit(request)
    hits = services.risk.hits
    with _redis_answers():
        await hits.flush()  # this process's latest hits too
        recent = await hits.recent(limit)
    return web.json_response({"hits": recent})


def _authorised(request: web.Request) -> Services:
    """The app's services, once the request carries the admin token (401 otherwise)."""
    services = request.app[SERVICES]
    services.admin.check(request.headers.get("Authorization"))
    return services


@contextlib.contextmanager
def _redis_answers() -> Iterator[None]:
    """Redis not answering inside it is a 503 the caller may retry (nothing was changed)."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable() from exc


def _who(request: web.Request) -> str:
    return f"admin-api:{request.remote or 'unknown'}"
