"""What a payment provider says at a reservation's deadline: paid, unpaid, or ask again later.

Before the sweeper releases a reservation that has a prepay, the provider decides: a payer who
paid a second before the deadline, whose notification was lost or is still being retried, keeps
the item. The order of the calls is the point:

1. query: paid → PAID (confirm it through the same atomic step as a notification);
2. not paid → close the provider's order, so nobody can pay it any more;
3. the close refused because the order *was paid* between 1 and 2 → query again → PAID.

Only after a successful close (or a provider order that is closed, or that never existed) is
the verdict UNPAID and the stock may be released. Anything else is RETRY: the stock stays held
until the provider has answered; the caller backs off (``backoff_s``) and alerts ops past its
ceiling. This module decides; it changes nothing in our store.
"""

from __future__ import annotations

import dataclasses
import enum
import logging

from seckill.payments.provider import (
    PaymentProvider,
    ProviderRefused,
    ProviderUnavailable,
    QueryResult,
)

log = logging.getLogger(__name__)

# the provider's order can still be paid in these states: it must be closed before release
_OPEN_STATES = frozenset({"NOTPAY", "USERPAYING", "PAYERROR"})
_CLOSED_STATES = frozenset({"CLOSED", "REVOKED"})
# WeChat Pay's codes for "this order was never placed" and "this order is already paid"
_NEVER_PLACED = frozenset({"ORDER_NOT_EXIST", "RESOURCE_NOT_EXISTS"})
_ALREADY_PAID = frozenset({"ORDERPAID", "ORDER_PAID", "TRADE_PAID"})


class Verdict(enum.StrEnum):
    PAID = "paid"  # the money was taken: confirm the order, never release it
    UNPAID = "unpaid"  # nobody paid and nobody can any more: release
    RETRY = "retry"  # the provider did not say: keep the stock held, ask again later


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    """The verdict, the provider's last view of the order (when it gave one), and why."""

    verdict: Verdict
    query: QueryResult | None
    reason: str


async def settle_at_deadline(provider: PaymentProvider, order_id: str) -> Settlement:
    """Ask, close if unpaid, ask again if the close says paid; never raises a provider fault."""
    first = await _query(provider, order_id)
    if isinstance(first, Settlement):
        return first
    if first.paid:
        return Settlement(Verdict.PAID, first, "paid before the deadline")
    if first.trade_state in _CLOSED_STATES:
        return Settlement(Verdict.UNPAID, first, f"the provider's order is {first.trade_state}")
    if first.trade_state not in _OPEN_STATES:
        return Settlement(Verdict.RETRY, first, f"unknown trade_state {first.trade_state!r}")
    try:
        await provider.close_order(order_id)
    except ProviderUnavailable as exc:
        return Settlement(Verdict.RETRY, first, f"close failed: {exc}")
    except ProviderRefused as exc:
        if exc.code not in _ALREADY_PAID:
            return Settlement(Verdict.RETRY, first, f"close refused: {exc.code} {exc.message}")
        # the payer paid between our query and our close: that payment stands
        second = await _query(provider, order_id)
        if isinstance(second, Settlement):
            return second
        if second.paid:
            return Settlement(Verdict.PAID, second, "paid while the order was being closed")
        return Settlement(Verdict.RETRY, second, "close said paid, the query does not (yet)")
    return Settlement(Verdict.UNPAID, first, "closed unpaid")


async def _query(provider: PaymentProvider, order_id: str) -> QueryResult | Settlement:
    try:
        return await provider.query(order_id)
    except ProviderUnavailable as exc:
        return Settlement(Verdict.RETRY, None, f"query failed: {exc}")
    except ProviderRefused as exc:
        if exc.code in _NEVER_PLACED:
            # the prepay never reached the provider: its time_expire is our deadline, so an
            # order a late retry creates now cannot be paid either (and a payment that slipped
            # through anyway still arrives as a notification: refund_required, never lost)
            return Settlement(Verdict.UNPAID, None, "the provider never saw this order")
        return Settlement(Verdict.RETRY, None, f"query refused: {exc.code} {exc.message}")


def backoff_s(attempt: int, *, base_s: float = 1.0, cap_s: float = 300.0) -> float:
    """Seconds before asking again after ``attempt`` failed tries (1, 2, 4 … up to ``cap_s``)."""
    return min(cap_s, base_s * 2.0 ** max(0, min(attempt - 1, 30)))
