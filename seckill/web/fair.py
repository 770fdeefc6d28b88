"""A fair sale's endpoints: registration, the caller's queue standing, the draw and registrants."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from seckill import clock, keys
from seckill.catalog import Entry
from seckill.errors import (
    InvalidRequest,
    NotFound,
    RateLimited,
    RedisUnavailable,
    RegistrationClosed,
    RiskRefused,
)
from seckill.limits import retry_after_s
from seckill.lottery import Lottery
from seckill.scripts import CONNECTION_ERRORS
from seckill.turns import Registration
from seckill.web.bodies import parse_json, read_limited
from seckill.web.middlewares import refusal
from seckill.web.public import device_id
from seckill.web.state import SERVICES, Services

routes = web.RouteTableDef()

ALGORITHM = (
    "order registrants by HMAC-SHA256(key=seed as 64 ASCII hex characters, message=user id "
    "UTF-8), ascending bytes, ties by user id; position 1 first; commitment = "
    'SHA-256(seed); order_digest = SHA-256("\\n".join(user ids in order))'
)
_EXPORT_MAX = 10_000


async def _entry(services: Services, activity_id: str) -> Entry:
    entry = (
        await services.catalog.get(activity_id) if keys.ID_PATTERN.fullmatch(activity_id) else None
    )
    if entry is None:
        raise NotFound("no such activity")
    return entry


@routes.post("/api/v1/activities/{activity_id}/registration", name="registration")
async def register(request: web.Request) -> web.Response:
    """Register the caller for a sale with a registration window: 201 once, 200 after."""
    services = request.app[SERVICES]
    user_id = services.users.user_id(request.headers.get("Authorization"))
    raw = await read_limited(request, services.settings.server.max_body_bytes)
    if raw.strip():
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise InvalidRequest("body must be empty or a JSON object")
        if body:
            raise InvalidRequest(f"unknown field: {sorted(body)[0]}")
    device = device_id(request.headers)
    entry = await _entry(services, request.match_info["activity_id"])
    activity = entry.activity
    # risk rules apply as on the purchase: deny list and velocity here, accounts per device in
    # register.lua's atomic step (the device is kept as its keyed hash only)
    risk = services.risk
    try:
        screening = await risk.screen(user_id, device, request.remote)
        if screening.refused:
            risk.record(activity.id, screening.subject, screening.hits)
            raise RiskRefused()
        registered = await services.turns.register(
            activity.id,
            user_id,
            screening.subject.device,
            risk.script_parts(activity.id, activity.id, screening),
        )
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable() from exc
    if registered.risk_hits:
        risk.record(activity.id, screening.subject, registered.risk_hits)
    if registered.outcome is Registration.RISK_REFUSED:
        raise RiskRefused()
    if registered.outcome is Registration.NOT_FOUND:
        raise NotFound("no such activity")
    if registered.outcome is Registration.CLOSED:
        if activity.registration_opens_at_ms is None:
            raise RegistrationClosed("this sale takes no registrations")
        raise RegistrationClosed(
            "registration is open from "
            f"{clock.to_rfc3339(activity.registration_opens_at_ms)} until "
            f"{clock.to_rfc3339(activity.starts_at_ms)}"
        )
    created = registered.outcome is Registration.CREATED
    body = {
        "activity_id": activity.id,
        "user_id": user_id,
        "registered": True,
        "admission": activity.admission,
        "starts_at": clock.to_rfc3339(activity.starts_at_ms),
    }
    return web.json_response(body, status=201 if created else 200)


@routes.get("/api/v1/activities/{activity_id}/queue", name="queue")
async def queue(request: web.Request) -> web.Response:
    """Where the caller stands: registered, position, admitted, ahead, eta_s (one script)."""
    services = request.app[SERVICES]
    user_id = services.users.user_id(request.headers.get("Authorization"))
    wait, burst = services.limits.take_order("queue", user_id)
    if wait:
        seconds = retry_after_s(wait)
        response = refusal(RateLimited("the queue is polled too often", retry_after=seconds))
        response.headers["RateLimit-Limit"] = str(max(int(burst), 1))
        response.headers["RateLimit-Remaining"] = "0"
        response.headers["RateLimit-Reset"] = str(seconds)
        return response
    entry = await _entry(services, request.match_info["activity_id"])
    activity = entry.activity
    try:
        standing = await services.turns.standing(activity.id, user_id)
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable() from exc
    if standing is None:
        raise NotFound("no such activity")
    if standing.status == "undrawn":
        services.lottery.kick(activity.id)
    if standing.status == "fcfs":
        admitted = standing.registered or not activity.registration
    else:
        admitted = standing.status == "admitted"
    eta_s = None if standing.eta_ms is None else math.ceil(standing.eta_ms / 1000)
    body: dict[str, Any] = {
        "registered": standing.registered,
        "position": standing.position,
        "admitted": admitted,
        "ahead": standing.ahead,
        "eta_s": eta_s,
        "turn": standing.status,
        "claim_expires_at": (
            clock.to_rfc3339(standing.claim_ends_ms) if standing.claim_ends_ms else None
        ),
    }
    return web.json_response(body)


async def _lottery_entry(request: web.Request) -> tuple[Services, Entry]:
    services = request.app[SERVICES]
    services.admin.check(request.headers.get("Authorization"))
    entry = await _entry(services, request.match_info["activity_id"])
    if not entry.activity.lottery:
        raise NotFound('this activity has no lottery (admission is not "lottery")')
    return services, entry


@routes.get("/admin/v1/activities/{activity_id}/draw", name="admin_draw")
async def draw(request: web.Request) -> web.Response:
    """A lottery's commitment (from creation), draw (from the start), seed (after the end)."""
    services, entry = await _lottery_entry(request)
    activity = entry.activity
    lottery: Lottery = services.lottery
    stored = await lottery.read(activity.id)
    if stored is None:
        raise NotFound("this activity has no draw")
    now_ms = await services.stock.redis_now_ms()
    if stored.drawn_at_ms is None and now_ms >= activity.starts_at_ms:
        lottery.kick(activity.id)  # due: nobody has asked for a turn yet
    revealed = now_ms >= activity.ends_at_ms
    body: dict[str, Any] = {
        "activity_id": activity.id,
        "algorithm": ALGORITHM,
        "commitment": stored.commitment,
        "registrants": await lottery.registrant_count(activity.id),
        "drawn": stored.drawn_at_ms is not None,
        "drawn_at": clock.to_rfc3339(stored.drawn_at_ms) if stored.drawn_at_ms else None,
        "placed": stored.count,
        "order_digest": stored.digest,
        "revealed": revealed,
        "seed": stored.seed if revealed else None,
        "reveals_at": clock.to_rfc3339(activity.ends_at_ms),
    }
    return web.json_response(body)


@routes.get("/admin/v1/activities/{activity_id}/registrants", name="admin_registrants")
async def registrants(request: web.Request) -> web.Response:
    """Registered user ids in registration order, a page at a time (?start=, ?limit=)."""
    services = request.app[SERVICES]
    services.admin.check(request.headers.get("Authorization"))
    unknown = sorted(set(request.query) - {"start", "limit"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter: {unknown[0]!r}")
    start = _query_int(request, "start", 0, 0, 10**9)
    limit = _query_int(request, "limit", 1000, 1, _EXPORT_MAX)
    entry = await _entry(services, request.match_info["activity_id"])
    activity_id = entry.activity.id
    count = await services.lottery.registrant_count(activity_id)
    page = await services.lottery.registrant_page(activity_id, start, limit)
    return web.json_response(
        {"activity_id": activity_id, "count": count, "start": start, "registrants": page}
    )


def _query_int(request: web.Request, name: str, default: int, lowest: int, highest: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit():
        raise InvalidRequest(f"{name} must be an integer in {lowest}..{highest}")
    value = int(raw)
    if not lowest <= value <= highest:
        raise InvalidRequest(f"{name} must be an integer in {lowest}..{highest}")
    return value
