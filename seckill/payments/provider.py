"""The payment provider interface: prepay, verify a callback, query, close, refund.

The gateway, the sweeper, the reconciler and the refunder speak only this. They name orders
by *our* order id; mapping it to a provider's trade number is the adapter's business. The
order's state machine stays in Lua and in one Python module, whatever the provider: an
adapter only reports what the provider says.

Faults come in three meanings, and callers handle exactly these:

- ``ProviderUnavailable``: the provider could not be asked (network, timeout, 5xx, 429, an
  answer that does not verify, our breaker open). Nothing is known; ask again later.
- ``ProviderRefused``: the provider answered and said no (a 4xx with its code). Asking again
  with the same request gets the same answer.
- ``BadCallback``: an inbound notification we must not believe (signature, timestamp, serial,
  decryption, shape). The gateway answers it with ``status`` and ``fail_body()``, so the
  provider retries a notification that was only damaged on the way.

Who calls what: the gateway ``prepay`` (then ``pay_parameters`` for a stored prepay id) and
``verify_notice``; the sweeper ``settle_at_deadline`` (``deadline.py``: query, close, query)
before it releases a prepaid reservation; the reconciler ``query`` for quiet prepaid orders;
the refunder ``refund_step`` / ``follow_up`` (``refunds.py``) with an ``out_refund_no``
derived from the payment.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Protocol


class ProviderError(Exception):
    """Root of the payment provider's faults."""


class ProviderUnavailable(ProviderError):
    """The provider could not be asked or did not answer usefully: retry later."""


class ProviderRefused(ProviderError):
    """The provider answered with a business refusal (4xx), carrying its code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BadCallback(ProviderError):
    """A notification that must not be believed; answer it with ``status`` and the FAIL body."""

    def __init__(self, message: str, *, status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def fail_body(message: str) -> bytes:
    """WeChat Pay's answer to a notification it should send again."""
    return json.dumps({"code": "FAIL", "message": message}, ensure_ascii=False).encode()


@dataclasses.dataclass(frozen=True, slots=True)
class PrepayOrder:
    """What the gateway asks to be paid: our order, its amount, its payer and its deadline."""

    order_id: str
    description: str
    amount_total: int  # fen (CNY cents): the order's recorded price times quantity
    payer_openid: str
    expires_at_ms: int  # the reservation's deadline; the provider refuses payment after it


@dataclasses.dataclass(frozen=True, slots=True)
class Prepay:
    """A placed payment order and the parameters the mini program passes to the payment UI."""

    order_id: str
    out_trade_no: str
    prepay_id: str
    request_payment: Mapping[str, str]  # appId, timeStamp, nonceStr, package, signType, paySign


@dataclasses.dataclass(frozen=True, slots=True)
class PaymentNotice:
    """A verified, decrypted payment notification (TRANSACTION.SUCCESS)."""

    notice_id: str  # the notification's id: the same on every retry of one notification
    event_type: str
    order_id: str | None  # ours, when the trade number or the attach names one consistently
    out_trade_no: str
    transaction_id: str
    trade_state: str
    amount_total: int
    currency: str
    payer_openid: str
    mchid: str
    appid: str
    success_time: str | None
    for_us: bool  # mchid and appid are ours; a notice that is not is recorded, never paid

    @property
    def paid(self) -> bool:
        """The provider says the money was taken."""
        return self.trade_state == "SUCCESS"


@dataclasses.dataclass(frozen=True, slots=True)
class RefundNotice:
    """A verified, decrypted refund notification (REFUND.SUCCESS / ABNORMAL / CLOSED)."""

    notice_id: str
    event_type: str
    order_id: str | None
    out_trade_no: str
    transaction_id: str
    out_refund_no: str
    refund_id: str
    refund_status: str  # SUCCESS, ABNORMAL (money could not reach the payer) or CLOSED
    amount_refund: int
    amount_total: int
    mchid: str
    success_time: str | None
    for_us: bool


Notice = PaymentNotice | RefundNotice


@dataclasses.dataclass(frozen=True, slots=True)
class QueryResult:
    """The provider's view of one payment order (主动查单)."""

    order_id: str
    out_trade_no: str
    trade_state: str  # SUCCESS, REFUND, NOTPAY, CLOSED, REVOKED, USERPAYING, PAYERROR
    transaction_id: str | None
    amount_total: int | None
    payer_openid: str | None
    mchid: str
    appid: str
    success_time: str | None
    for_us: bool  # mchid and appid are ours

    @property
    def paid(self) -> bool:
        """Money was taken (REFUND: taken, then at least partly refunded)."""
        return self.trade_state in ("SUCCESS", "REFUND")

    @property
    def settled(self) -> bool:
        """No payment can happen any more without the merchant placing a new order."""
        return self.trade_state in ("SUCCESS", "REFUND", "CLOSED", "REVOKED")


@dataclasses.dataclass(frozen=True, slots=True)
class RefundRequest:
    """Give money back; ``out_refund_no`` comes from the payment, so a retry never pays twice."""

    order_id: str
    out_refund_no: str
    amount_refund: int
    amount_total: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class RefundResult:
    """The provider's view of one refund."""

    out_refund_no: str
    refund_id: str
    out_trade_no: str
    status: str  # SUCCESS, CLOSED, PROCESSING, ABNORMAL
    amount_refund: int
    amount_total: int
    success_time: str | None


class PaymentProvider(Protocol):
    """What the gateway, sweeper, reconciler and refunder call; one adapter per provider."""

    async def prepay(self, order: PrepayOrder) -> Prepay:
        """Place the payment order (the same one again for the same order and parameters)."""
        ...

    def pay_parameters(self, prepay_id: str) -> Mapping[str, str]:
        """Sign the client's payment parameters for a stored prepay id, without a network call."""
        ...

    def verify_notice(self, headers: Mapping[str, str], body: bytes) -> Notice:
        """Verify and decrypt a notification; BadCallback when it must not be believed."""
        ...

    async def query(self, order_id: str) -> QueryResult:
        """Ask the provider whether the order was paid."""
        ...

    async def close_order(self, order_id: str) -> None:
        """Close the payment order so it can no longer be paid (idempotent)."""
        ...

    async def refund(self, request: RefundRequest) -> RefundResult:
        """Ask for a refund; the same ``out_refund_no`` again returns the same refund."""
        ...

    async def query_refund(self, out_refund_no: str) -> RefundResult:
        """Ask the provider about a refund."""
        ...

    async def aclose(self) -> None:
        """Release the adapter's connections."""
        ...
