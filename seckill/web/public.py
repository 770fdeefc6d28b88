"""Public endpoints: the mini program's activity read, order POST and order GET."""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import Any

from aiohttp import web

from seckill import clock, keys, purchase
from seckill.catalog import Entry
from seckill.errors import (
    Conflict,
    InvalidRequest,
    NotCancellable,
    NotFound,
    Overloaded,
    RateLimited,
)
from seckill.limits import retry_after_s
from seckill.orders.record import OrderRecord
from seckill.orders.store import StoreUnavailable
from seckill.skus import OrderRequest, order_request
from seckill.stock import Outcome, Payment, Release, payment_hash
from seckill.web.bodies import body_now, parse_json, read_limited
from seckill.web.middlewares import OUTCOME, refusal
from seckill.web.state import SERVICES, Services

routes = web.RouteTableDef()

_NO_SUCH_ORDER = NotFound("no such order")


async def _entry(services: Services, activity_id: str) -> Entry:
    """The cached activity, or NotFound (ids that cannot exist or are not in the catalog's
    set of known ids never reach Redis)."""
    entry = (
        await services.catalog.get(activity_id) if keys.ID_PATTERN.fullmatch(activity_id) else None
    )
    if entry is None:
        raise NotFound("no such activity")
    return entry


def _order_accepted(
    activity_id: str, order_id: str, quantity: int, expires_at_ms: int, replayed: bool
) -> web.Response:
    expires_at = clock.to_rfc3339(expires_at_ms)
    if keys.ORDER_ID_PATTERN.fullmatch(order_id):
        # every value is of a shape JSON needs no escape for (ids of [A-Za-z0-9_.-], an
        # integer, an RFC 3339 time): spelled as json.dumps spells it, without its encoder
        text = (
            f'{{"order_id": "{order_id}", "activity_id": "{activity_id}", '
            f'"quantity": {quantity}, "status": "reserved", "expires_at": "{expires_at}"}}'
        )
        response = web.Response(text=text, status=202, content_type="application/json")
    else:  # pragma: no cover - every order id seckill mints matches
        response = web.json_response(
            {
                "order_id": order_id,
                "activity_id": activity_id,
                "quantity": quantity,
                "status": "reserved",
                "expires_at": expires_at,
            },
            status=202,
        )
    response.headers["Location"] = f"/api/v1/orders/{order_id}"
    response[OUTCOME] = "ok"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def rate_limited(wait_s: float, burst: float) -> web.Response:
    """429 with Retry-After and the RateLimit-* headers of a bucket of ``burst``."""
    seconds = retry_after_s(wait_s)
    response = refusal(RateLimited(retry_after=seconds))
    response.headers["RateLimit-Limit"] = str(max(int(burst), 1))
    response.headers["RateLimit-Remaining"] = "0"
    response.headers["RateLimit-Reset"] = str(seconds)
    return response


def device_id(headers: Mapping[str, str]) -> str:
    """The optional X-Device-Id ("" when absent); InvalidRequest when malformed."""
    device = headers.get("X-Device-Id")
    if device is None:
        return ""
    if not keys.IDEMPOTENCY_KEY_PATTERN.fullmatch(device):
        raise InvalidRequest("X-Device-Id header must be 1-64 characters of [A-Za-z0-9_-]")
    return device


@routes.post("/api/v1/activities/{activity_id}/orders", name="order_create")
async def create_order(request: web.Request) -> web.Response:
    """Reserve stock for the caller (the lanes in web/lane.py take most of these first)."""
    placed = place_order(request.app[SERVICES], request, request.match_info["activity_id"])
    return placed if isinstance(placed, web.Response) else await placed


def place_order(
    services: Services, request: web.Request, activity_id: str
) -> web.Response | Coroutine[None, None, web.Response]:
    """The order POST: the request's shape here, the decision in purchase.py.

    The response itself when this process answers alone (a bad request, the sold-out fast
    path: no coroutine for the storm's common case), else the coroutine that finishes it.
    """
    user_id, tier = services.users.user(request.headers.get("Authorization"))
    limit = services.settings.server.max_body_bytes
    raw = body_now(request, limit)
    if raw is None:  # still arriving: wait for it under the body deadline
        return _place_order_later(services, request, activity_id, user_id, tier)
    decision = order_decision(
        services, request.headers, request.remote, activity_id, user_id, tier, raw
    )
    if isinstance(decision, purchase.Decision):
        return answer_of(activity_id, decision)
    return _answer_when(activity_id, decision)


async def _place_order_later(
    services: Services, request: web.Request, activity_id: str, user_id: str, tier: str
) -> web.Response:
    raw = await read_limited(request, services.settings.server.max_body_bytes)
    decision = order_decision(
        services, request.headers, request.remote, activity_id, user_id, tier, raw
    )
    if not isinstance(decision, purchase.Decision):
        decision = await decision
    return answer_of(activity_id, decision)


def order_decision(
    services: Services,
    headers: Mapping[str, str],
    remote: str | None,
    activity_id: str,
    user_id: str,
    tier: str,
    raw: bytes,
) -> purchase.Decision | Coroutine[None, None, purchase.Decision]:
    """An authenticated order POST whose body is in, decided: the Decision itself when this
    process decides alone, else the coroutine that asks Redis. Raises for a bad request.

    Both lanes and the router come here: the HTTP request object is not needed.
    """
    order = order_request(raw)
    idempotency_key = headers.get("Idempotency-Key", "")
    if not keys.IDEMPOTENCY_KEY_PATTERN.fullmatch(idempotency_key):
        raise InvalidRequest("Idempotency-Key header must be 1-64 characters of [A-Za-z0-9_-]")
    device = device_id(headers)
    # cached (the storm's case): no coroutine, no id check (only valid ids are ever cached)
    entry = services.catalog.entries().get(activity_id)
    if entry is None:
        return _decided_uncached(services, activity_id, user_id, tier, order, idempotency_key,
                                 device, remote)  # fmt: skip
    return purchase.decide(services, entry, user_id, tier, order, idempotency_key, device, remote)


async def _decided_uncached(
    services: Services,
    activity_id: str,
    user_id: str,
    tier: str,
    order: OrderRequest,
    idempotency_key: str,
    device: str,
    remote: str | None,
) -> purchase.Decision:
    entry = await _entry(services, activity_id)
    decision = purchase.decide(
        services, entry, user_id, tier, order, idempotency_key, device, remote
    )
    if not isinstance(decision, purchase.Decision):
        decision = await decision
    return decision


async def _answer_when(
    activity_id: str, deciding: Coroutine[None, None, purchase.Decision]
) -> web.Response:
    return answer_of(activity_id, await deciding)


def answer_of(activity_id: str, decision: purchase.Decision) -> web.Response:
    """The routed answer to a decided order POST (web/wire.py spells the lane's as bytes)."""
    reservation = decision.reservation
    if reservation is not None:
        return _order_accepted(
            activity_id,
            reservation.order_id,
            reservation.quantity,
            reservation.expires_at_ms,
            replayed=reservation.outcome is Outcome.REPLAY,
        )
    if decision.limited is not None:
        return rate_limited(*decision.limited)
    assert decision.error is not None
    return refusal(decision.error)


@routes.get("/api/v1/activities/{activity_id}", name="activity_get")
async def get_activity(request: web.Request) -> web.Response:
    """The activity as the mini program shows it (stock_left may lag by up to 1 s)."""
    services = request.app[SERVICES]
    activity_id = request.match_info["activity_id"]
    entry = await _entry(services, activity_id)
    switches = services.switches
    paused = switches.value(f"activity.{activity_id}.paused") is True
    now = clock.now_ms()
    if switches.value(f"activity.{activity_id}.closed") is True:
        now = max(now, entry.activity.ends_at_ms)  # closed early: shown as ended
    return web.json_response(entry.activity.public(now, entry.stock_left, paused, entry.sku_left))


@routes.get("/api/v1/orders/{order_id}", name="order_get")
async def get_order(request: web.Request) -> web.Response:
    """The caller's own order; someone else's is indistinguishable from a missing one."""
    services = request.app[SERVICES]
    user_id = services.users.user_id(request.headers.get("Authorization"))
    limited = _order_rate_limited(services, "read", user_id)
    if limited is not None:
        return limited
    record = await _own_order(services, request.match_info["order_id"], user_id)
    return web.json_response(_order_body(services, record))


def _order_body(services: Services, record: OrderRecord) -> dict[str, Any]:
    """The order as its owner sees it: the address decrypted, the phone masked."""
    body = record.public()
    if record.address:
        sealer = services.personal
        body["address"] = sealer.reveal(record.address, record.order_id) if sealer else None
    return body


def _order_rate_limited(services: Services, scope: str, user_id: str) -> web.Response | None:
    """429 when the user's order ``scope`` bucket (limits.toml [orders]) is empty."""
    wait, burst = services.limits.take_order(scope, user_id)
    return rate_limited(wait, burst) if wait else None


async def _own_order(services: Services, order_id: str, user_id: str) -> OrderRecord:
    activity_id = keys.activity_of_order(order_id)
    if activity_id is None or not services.catalog.known(activity_id):
        raise NotFound("no such order")  # no such activity: neither Redis nor the store asked
    record = await services.stock.order(order_id)
    if record is None:
        # Redis is the live copy; the store is the record once Redis has let an order go
        try:
            record = await services.store.order(order_id)
        except StoreUnavailable as exc:
            raise Overloaded("order store unavailable") from exc
    if record is None or record.user_id != user_id:
        raise NotFound("no such order")
    return record


@routes.post("/api/v1/orders/{order_id}/cancel", name="order_cancel")
async def cancel_order(request: web.Request) -> web.Response:
    """The owner gives a reserved order up; its stock goes back on sale.

    A retried cancel (the first attempt's answer was lost) answers 200 again with the order,
    whether the order is still in Redis or has left it for the store.
    """
    services = request.app[SERVICES]
    user_id = services.users.user_id(request.headers.get("Authorization"))
    limited = _order_rate_limited(services, "cancel", user_id)
    if limited is not None:
        return limited
    await read_limited(request, services.settings.server.max_body_bytes)
    order_id = request.match_info["order_id"]
    activity_id = keys.activity_of_order(order_id)
    if activity_id is None or not services.catalog.known(activity_id):
        return refusal(_NO_SUCH_ORDER)
    outcome = await services.stock.release(order_id, "cancelled", owner=user_id)
    # not released: answer from what the order is now (Redis, else the store); someone
    # else's order, or none, stays a 404
    record = await _own_order(services, order_id, user_id)
    if outcome is Release.RELEASED or record.status == "cancelled":
        return web.json_response(_order_body(services, record))
    raise NotCancellable()


_PAYMENT_FIELDS = {"event_id", "order_id", "amount_cents", "status"}


def _payment(body: Any) -> tuple[str, str, int, bool]:
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = sorted(set(body) - _PAYMENT_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field: {unknown[0]}")
    missing = sorted(_PAYMENT_FIELDS - set(body))
    if missing:
        raise InvalidRequest(f"missing field: {missing[0]}")
    event_id, order_id = body["event_id"], body["order_id"]
    amount, status = body["amount_cents"], body["status"]
    if not isinstance(event_id, str) or not keys.IDEMPOTENCY_KEY_PATTERN.fullmatch(event_id):
        raise InvalidRequest("event_id must be 1-64 characters of [A-Za-z0-9_-]")
    if not isinstance(order_id, str) or not 1 <= len(order_id) <= 200:
        raise InvalidRequest("order_id must be a string")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise InvalidRequest("amount_cents must be a non-negative integer")
    if status not in ("SUCCESS", "FAILED"):
        raise InvalidRequest('status must be "SUCCESS" or "FAILED"')
    return event_id, order_id, amount, status == "SUCCESS"


@routes.post("/api/v1/payments/notify", name="payment_notify")
async def payment_notify(request: web.Request) -> web.Response:
    """The payment provider's callback: paid, refund_required or ignored, once per event id."""
    services = request.app[SERVICES]
    # the header's shape and timestamp before the body: a forged callback reads nothing
    signature = services.payments.check_header(request.headers.get("Seckill-Signature"))
    raw = await read_limited(request, services.settings.server.max_body_bytes)
    services.payments.check_body(signature, raw)
    event_id, order_id, amount, success = _payment(parse_json(raw))
    try:
        outcome = await services.stock.pay(
            order_id,
            event_id,
            amount,
            success,
            payment_hash(event_id, order_id, amount, success),
            provider="seckill",
            retired=services.store.order,
        )
    except StoreUnavailable as exc:
        raise Overloaded("order store unavailable") from exc
    if outcome is Payment.CONFLICT:
        raise Conflict("this event_id was already used with another order or payload")
    if outcome is Payment.NOT_FOUND:
        raise NotFound("no such order")
    if outcome is Payment.AMOUNT_MISMATCH:
        raise InvalidRequest("amount_cents does not match the order's price times quantity")
    return web.json_response({"result": outcome.value})


async def _non_core(request: web.Request, name: str) -> web.Response:
    services = request.app[SERVICES]
    activity_id = request.match_info["activity_id"]
    await _entry(services, activity_id)
    assert services.http is not None
    enabled = services.switches.value(f"{name}.enabled") is not False
    body = await services.upstreams[name].fetch(services.http, activity_id, enabled)
    return web.json_response(body)


@routes.get("/api/v1/activities/{activity_id}/reviews", name="reviews")
async def reviews(request: web.Request) -> web.Response:
    """Reviews from the configured upstream; a degraded fallback when it cannot answer."""
    return await _non_core(request, "reviews")


@routes.get("/api/v1/activities/{activity_id}/recommendations", name="recommendations")
async def recommendations(request: web.Request) -> web.Response:
    """Recommendations from the configured upstream; a degraded fallback when it cannot."""
    return await _non_core(request, "recommendations")
