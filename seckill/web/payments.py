"""WeChat Pay at the edge: the mini program's prepay, WeChat Pay's notifications, refunds for ops.

Never on the purchase path: an order is reserved first (public.py, reserve_stock.lua); paying
is a second, separate step on an order that already holds its stock.

The notification endpoint answers the way WeChat Pay reads answers, not with the contract's
error body: 204 with no body once handled (WeChat stops sending), 4xx/5xx with
``{"code": "FAIL", "message"}`` when it should send again (a notice damaged on the way, our
Redis or store away). A notice that verifies but must not be believed as a payment (not our
merchant, a wrong amount, an unknown order) is kept for a person and answered 204: sending it
again would not change it.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from seckill import clock, keys
from seckill.errors import (
    InvalidRequest,
    NotFound,
    NotPayable,
    Overloaded,
    PaymentUnavailable,
    RedisUnavailable,
    SeckillError,
)
from seckill.orders.record import OrderRecord
from seckill.orders.store import StoreUnavailable
from seckill.payments.ledger import Ledger, PrepayRecord
from seckill.payments.provider import (
    BadCallback,
    PaymentNotice,
    PrepayOrder,
    ProviderRefused,
    ProviderUnavailable,
    RefundNotice,
    fail_body,
)
from seckill.payments.settlement import PROVIDER, Books, Refunder, confirm
from seckill.payments.wechatpay import out_refund_no_for
from seckill.scripts import CONNECTION_ERRORS
from seckill.stock import Payment
from seckill.web.admin import _page_limit
from seckill.web.bodies import parse_json, read_limited
from seckill.web.middlewares import OUTCOME
from seckill.web.public import _order_rate_limited, _own_order
from seckill.web.state import SERVICES, Services

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_UNAVAILABLE = PaymentUnavailable("WeChat Pay cannot be reached, retry shortly", retry_after=2)
_NOT_CONFIGURED = PaymentUnavailable("payments are not configured here", retry_after=60)
_NOT_PAYABLE = NotPayable()
# our side away: WeChat Pay should send the notification again later
_AWAY: tuple[type[BaseException], ...] = (RedisUnavailable, StoreUnavailable, *CONNECTION_ERRORS)


def _ledger(services: Services) -> Ledger:
    return Ledger(services.redis, services.scripts)


async def _unit_price(services: Services, record: OrderRecord) -> tuple[int, str]:
    """The unit price the order was sold at, and the activity's title."""
    entry = await services.catalog.get(record.activity_id)
    title = entry.activity.title if entry is not None else record.activity_id
    if record.price_cents >= 0:
        return record.price_cents, title
    if entry is None:
        raise Overloaded("the activity could not be read, retry", retry_after=1)
    return entry.activity.price_cents, title


def _prepay_body(record: PrepayRecord, expires_at_ms: int, parameters: Any) -> dict[str, Any]:
    return {
        "order_id": record.order_id,
        "prepay_id": record.prepay_id,
        "expires_at": clock.to_rfc3339(expires_at_ms),
        "request_payment": dict(parameters),
    }


@routes.post("/api/v1/orders/{order_id}/payment", name="order_payment")
async def prepay(request: web.Request) -> web.Response:
    """Place (once) the WeChat Pay order of a reserved order; the mini program's pay parameters.

    Checks: auth (401) → body size (413) → body shape (400) → the token's openid (400) → the
    order, the caller's own (404) → reserved and within its deadline (409 not_payable) →
    WeChat Pay reachable (503 payment_unavailable).
    """
    services = request.app[SERVICES]
    user_id, openid = services.users.payer(request.headers.get("Authorization"))
    limited = _order_rate_limited(services, "pay", user_id)
    if limited is not None:
        return limited
    raw = await read_limited(request, services.settings.server.max_body_bytes)
    if raw.strip():
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object (or empty)")
        if body:
            raise InvalidRequest(f"unknown field: {sorted(body)[0]}")
    if not openid:
        raise InvalidRequest("the token carries no openid claim: WeChat Pay needs the payer")
    order_id = request.match_info["order_id"]
    record = await _own_order(services, order_id, user_id)
    if record.status != "reserved":
        raise _NOT_PAYABLE
    provider = services.wechatpay
    if provider is None:
        raise _NOT_CONFIGURED
    ledger = _ledger(services)
    answer = await ledger.prepay(order_id, user_id)
    if answer.outcome == "not_found":
        raise NotFound("no such order")
    if answer.outcome == "not_payable":
        raise _NOT_PAYABLE
    if answer.outcome == "exists" and answer.record is not None:
        # the same prepay again, with parameters signed afresh (a new nonce and timestamp)
        parameters = provider.pay_parameters(answer.record.prepay_id)
        return web.json_response(_prepay_body(answer.record, record.expires_at_ms, parameters))
    unit, title = await _unit_price(services, record)
    amount = unit * record.quantity
    try:
        placed = await provider.prepay(
            PrepayOrder(
                order_id=order_id,
                description=title,
                amount_total=amount,
                payer_openid=openid,
                expires_at_ms=record.expires_at_ms,
            )
        )
    except ProviderUnavailable as exc:
        log.warning("prepay of %s: %s", order_id, exc)
        raise _UNAVAILABLE from exc
    except ProviderRefused as exc:
        # WeChat Pay said no to this order (closed, expired, its parameters): not payable
        raise NotPayable(f"WeChat Pay refused the payment order: {exc.code}") from exc
    except ValueError as exc:
        raise NotPayable(str(exc)) from exc
    stored = await ledger.prepay(
        order_id,
        user_id,
        PrepayRecord(
            order_id=order_id,
            prepay_id=placed.prepay_id,
            out_trade_no=placed.out_trade_no,
            amount_cents=amount,
            openid=openid,
            at_ms=clock.now_ms(),
        ),
    )
    if stored.outcome == "stored" and stored.record is not None:
        return web.json_response(
            _prepay_body(stored.record, record.expires_at_ms, placed.request_payment)
        )
    if stored.outcome == "exists" and stored.record is not None:
        # a concurrent call stored its prepay first: that one is the order's
        parameters = provider.pay_parameters(stored.record.prepay_id)
        return web.json_response(_prepay_body(stored.record, record.expires_at_ms, parameters))
    # the deadline passed while WeChat Pay answered: its order expires with ours (time_expire)
    raise _NOT_PAYABLE


def _fail(status: int, message: str) -> web.Response:
    response = web.Response(status=status, body=fail_body(message), content_type="application/json")
    response[OUTCOME] = f"fail_{status}"  # counted by the middleware like the other refusals
    return response


@routes.post("/api/v1/payments/wechat/notify", name="wechatpay_notify")
async def wechat_notify(request: web.Request) -> web.Response:
    """WeChat Pay's notification: verified, decrypted, applied once; 204 or a FAIL body."""
    services = request.app[SERVICES]
    try:
        raw = await read_limited(request, services.settings.server.max_body_bytes)
    except SeckillError as exc:  # 413, 408: WeChat's answer shape, not the contract's
        return _fail(exc.status, exc.message)
    provider = services.wechatpay
    if provider is None:
        return _fail(404, "WeChat Pay is not configured here")
    try:
        notice = provider.verify_notice(request.headers, raw)
    except BadCallback as exc:
        # nothing was read from it and nothing changes: WeChat sends it again if it was real
        return _fail(exc.status, exc.message)
    try:
        if isinstance(notice, PaymentNotice):
            await _payment(services, notice)
        else:
            await _refund(services, notice)
    except _AWAY as exc:
        log.warning("WeChat Pay notice %s not applied now: %r", notice.notice_id, exc)
        return _fail(503, "temporarily unable to record the notification, send it again")
    except SeckillError as exc:  # Redis full (OOM) and the like: ask WeChat to send it again
        return _fail(503, exc.message)
    return web.Response(status=204)


async def _payment(services: Services, notice: PaymentNotice) -> None:
    ledger = _ledger(services)
    if not notice.paid:
        return  # only TRANSACTION.SUCCESS is sent today; anything else changes nothing
    if not notice.for_us or notice.currency != "CNY" or notice.order_id is None:
        reason = "not_our_merchant" if not notice.for_us else "unknown_order"
        if notice.currency != "CNY":
            reason = "currency"
        log.error("WeChat Pay notice %s kept, not applied: %s", notice.notice_id, reason)
        await ledger.suspicious(
            reason,
            provider=PROVIDER,
            notice_id=notice.notice_id,
            transaction_id=notice.transaction_id,
            out_trade_no=notice.out_trade_no,
            order_id=notice.order_id,
            amount_cents=notice.amount_total,
            mchid=notice.mchid,
            appid=notice.appid,
        )
        return
    if keys.activity_of_order(notice.order_id) is None:
        await ledger.suspicious("unknown_order", provider=PROVIDER, order_id=notice.order_id)
        return
    payment = await confirm(
        services.stock,
        ledger,
        services.store.order,
        notice.order_id,
        notice.transaction_id,
        notice.amount_total,
        notice.success_time,
    )
    if payment is Payment.PAID:
        await ledger.forget_prepay(notice.order_id)


async def _refund(services: Services, notice: RefundNotice) -> None:
    ledger = _ledger(services)
    provider = services.wechatpay
    assert provider is not None
    if not notice.for_us:
        await ledger.suspicious(
            "not_our_merchant",
            provider=PROVIDER,
            notice_id=notice.notice_id,
            out_refund_no=notice.out_refund_no,
            mchid=notice.mchid,
        )
        return
    refunder = Refunder(Books(services.stock, ledger, provider, None), out_refund_no_for)
    if not await refunder.on_notice(notice):
        await ledger.suspicious(
            "unknown_refund",
            provider=PROVIDER,
            notice_id=notice.notice_id,
            out_refund_no=notice.out_refund_no,
        )


@routes.get("/admin/v1/activities/{activity_id}/refunds", name="admin_refunds")
async def refunds(request: web.Request) -> web.Response:
    """The activity's refunds (refund_required payments on their way back), oldest first."""
    services = request.app[SERVICES]
    services.admin.check(request.headers.get("Authorization"))
    activity_id = request.match_info["activity_id"]
    limit = _page_limit(request)
    if (
        not keys.ID_PATTERN.fullmatch(activity_id)
        or await services.catalog.get(activity_id) is None
    ):
        raise NotFound("no such activity")
    records = await _ledger(services).refunds(activity_id)
    return web.json_response(
        {"activity_id": activity_id, "refunds": [r.public() for r in records[:limit]]}
    )
