"""Public endpoints: the mini program's activity read, order POST and order GET."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from seckill import clock, keys
from seckill.catalog import Entry
from seckill.errors import (
    Ended,
    IdempotencyKeyReused,
    InvalidRequest,
    LimitReached,
    NotFound,
    NotStarted,
    Overloaded,
    SeckillError,
    SoldOut,
)
from seckill.stock import Outcome
from seckill.web.bodies import parse_json, read_limited
from seckill.web.middlewares import refusal
from seckill.web.state import SERVICES, Services

routes = web.RouteTableDef()

_SOLD_OUT = SoldOut()
_ENDED = Ended()
_REFUSALS: dict[Outcome, SeckillError] = {
    Outcome.NOT_FOUND: NotFound("no such activity"),
    Outcome.REUSED: IdempotencyKeyReused(),
    Outcome.NOT_STARTED: NotStarted(),
    Outcome.ENDED: _ENDED,
    Outcome.LIMIT_REACHED: LimitReached(),
    Outcome.SOLD_OUT: _SOLD_OUT,
}


def _quantity(body: Any) -> int:
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = sorted(set(body) - {"quantity"})
    if unknown:
        raise InvalidRequest(f"unknown field: {unknown[0]}")
    if "quantity" not in body:
        raise InvalidRequest("missing field: quantity")
    quantity = body["quantity"]
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
        raise InvalidRequest("quantity must be a positive integer")
    return quantity


async def _entry(services: Services, activity_id: str) -> Entry:
    """The cached activity, or NotFound (ids that cannot exist never reach Redis)."""
    entry = (
        await services.catalog.get(activity_id) if keys.ID_PATTERN.fullmatch(activity_id) else None
    )
    if entry is None:
        raise NotFound("no such activity")
    return entry


def _order_accepted(
    activity_id: str, order_id: str, quantity: int, expires_at_ms: int, replayed: bool
) -> web.Response:
    response = web.json_response(
        {
            "order_id": order_id,
            "activity_id": activity_id,
            "quantity": quantity,
            "status": "reserved",
            "expires_at": clock.to_rfc3339(expires_at_ms),
        },
        status=202,
    )
    response.headers["Location"] = f"/api/v1/orders/{order_id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@routes.post("/api/v1/activities/{activity_id}/orders", name="order_create")
async def create_order(request: web.Request) -> web.Response:
    """Reserve stock for the caller: checks in the contract's order, then one atomic script."""
    services = request.app[SERVICES]
    user_id = services.users.user_id(request.headers.get("Authorization"))
    raw = await read_limited(request, services.settings.server.max_body_bytes)
    quantity = _quantity(parse_json(raw))
    idempotency_key = request.headers.get("Idempotency-Key", "")
    if not keys.IDEMPOTENCY_KEY_PATTERN.fullmatch(idempotency_key):
        raise InvalidRequest("Idempotency-Key header must be 1-64 characters of [A-Za-z0-9_-]")

    activity_id = request.match_info["activity_id"]
    entry = await _entry(services, activity_id)
    activity = entry.activity
    if quantity > activity.per_user_limit:
        raise InvalidRequest(f"quantity must be at most {activity.per_user_limit}")

    if entry.sold_out_for(user_id):
        # the storm's common case: no Redis round trip for a user who holds nothing here
        return refusal(_ENDED if clock.now_ms() >= activity.ends_at_ms else _SOLD_OUT)

    reservation = await services.stock.reserve(activity_id, user_id, idempotency_key, quantity)
    outcome = reservation.outcome
    if outcome is Outcome.OK:
        services.catalog.note_reserved(activity_id, reservation.stock_left or 0)
    if outcome in (Outcome.OK, Outcome.REPLAY):
        return _order_accepted(
            activity_id,
            reservation.order_id,
            reservation.quantity,
            reservation.expires_at_ms,
            replayed=outcome is Outcome.REPLAY,
        )
    if outcome is Outcome.SOLD_OUT:
        services.catalog.note_sold_out(activity_id)
    error = _REFUSALS.get(outcome)
    if error is None:
        raise Overloaded(f"refused: {reservation.gate}")
    return refusal(error)


@routes.get("/api/v1/activities/{activity_id}", name="activity_get")
async def get_activity(request: web.Request) -> web.Response:
    """The activity as the mini program shows it (stock_left may lag by up to 1 s)."""
    services = request.app[SERVICES]
    activity_id = request.match_info["activity_id"]
    entry = await _entry(services, activity_id)
    return web.json_response(entry.activity.public(clock.now_ms(), entry.stock_left))


@routes.get("/api/v1/orders/{order_id}", name="order_get")
async def get_order(request: web.Request) -> web.Response:
    """The caller's own order; someone else's is indistinguishable from a missing one."""
    services = request.app[SERVICES]
    user_id = services.users.user_id(request.headers.get("Authorization"))
    record = await services.stock.order(request.match_info["order_id"])
    if record is None or record.user_id != user_id:
        raise NotFound("no such order")
    return web.json_response(record.public())
