"""One refund step for the refunder: ask (or ask again), and say what the answer means.

Every ``refund_required`` payment is refunded with an ``out_refund_no`` derived from the
order, so asking again after a timeout, a crash or a restart is the same refund, never a
second one. The answer falls in four meanings; the refunder stores the verdict and acts:

- REFUNDED: the money is back with the payer.
- PENDING: the provider is working on it; a REFUND.* notification or ``query_refund`` ends it.
- RETRY: nothing is known or the provider said "not now" (unreachable, 5xx, rate limited, the
  merchant's balance too low); ask again later with the same refund number.
- ATTENTION: the provider will not finish it alone (ABNORMAL: the payer's account refused the
  money; CLOSED; a refusal of the request itself): a person must look.
"""

from __future__ import annotations

import dataclasses
import enum

from seckill.payments.provider import (
    PaymentProvider,
    ProviderRefused,
    ProviderUnavailable,
    RefundRequest,
    RefundResult,
)

# refusals that end by themselves: the merchant tops up its balance, the rate limit passes
_RETRYABLE_CODES = frozenset({"NOT_ENOUGH", "FREQUENCY_LIMITED", "SYSTEM_ERROR", "SYSTEMERROR"})


class RefundVerdict(enum.StrEnum):
    REFUNDED = "refunded"
    PENDING = "pending"
    RETRY = "retry"
    ATTENTION = "attention"


def verdict_of(status: str) -> RefundVerdict:
    """What a refund's provider status (answer, query or notification) means for us."""
    if status == "SUCCESS":
        return RefundVerdict.REFUNDED
    if status == "PROCESSING":
        return RefundVerdict.PENDING
    return RefundVerdict.ATTENTION  # ABNORMAL, CLOSED, or a status we do not know


@dataclasses.dataclass(frozen=True, slots=True)
class RefundStep:
    """The verdict, the provider's view of the refund (when it gave one), and why."""

    verdict: RefundVerdict
    result: RefundResult | None
    reason: str


async def refund_step(provider: PaymentProvider, request: RefundRequest) -> RefundStep:
    """Ask for the refund (idempotent by out_refund_no); never raises a provider fault."""
    try:
        result = await provider.refund(request)
    except ProviderUnavailable as exc:
        return RefundStep(RefundVerdict.RETRY, None, f"refund failed: {exc}")
    except ProviderRefused as exc:
        verdict = RefundVerdict.RETRY if exc.code in _RETRYABLE_CODES else RefundVerdict.ATTENTION
        return RefundStep(verdict, None, f"refund refused: {exc.code} {exc.message}")
    return RefundStep(verdict_of(result.status), result, f"refund {result.status}")


async def follow_up(provider: PaymentProvider, out_refund_no: str) -> RefundStep:
    """Ask about a PENDING refund whose notification has not come."""
    try:
        result = await provider.query_refund(out_refund_no)
    except ProviderUnavailable as exc:
        return RefundStep(RefundVerdict.RETRY, None, f"refund query failed: {exc}")
    except ProviderRefused as exc:
        return RefundStep(
            RefundVerdict.ATTENTION, None, f"refund query refused: {exc.code} {exc.message}"
        )
    return RefundStep(verdict_of(result.status), result, f"refund {result.status}")
