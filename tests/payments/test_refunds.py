"""The refunder's step: one refund per payment whatever fails, and a verdict for every answer.

Invariants: asking again (after failures, or after it succeeded) never refunds twice; a refusal
that passes by itself (balance too low, rate limit) is retried, one that will not is put in
front of a person; a refund that could not reach the payer is never taken for done.
"""

from __future__ import annotations

import time

import pytest

from seckill.payments.provider import PrepayOrder, RefundNotice, RefundRequest
from seckill.payments.refunds import RefundVerdict, follow_up, refund_step, verdict_of
from seckill.payments.wechatpay import out_refund_no_for, out_trade_no_for
from tests.payments.conftest import Wiring, eventually

_serial = iter(range(10**6))


async def _paid(wiring: Wiring, total: int = 600) -> RefundRequest:
    order = PrepayOrder(
        order_id=f"rf{next(_serial)}.{'a7' * 10}",
        description="Phone",
        amount_total=total,
        payer_openid="oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
        expires_at_ms=int((time.time() + 900) * 1000),
    )
    await wiring.client.prepay(order)
    wiring.fake.faults.drop = 1  # the payment notice is not what these tests are about
    wiring.fake.pay(out_trade_no_for(order.order_id))
    return RefundRequest(
        order.order_id, out_refund_no_for(order.order_id), total, total, "paid after expiry"
    )


async def test_failures_then_success_refund_exactly_once(wiring: Wiring) -> None:
    request = await _paid(wiring)
    wiring.fake.refund_settle_s = 60.0  # stays PROCESSING while we look
    wiring.fake.fail_next("refund", 2)
    verdicts = [(await refund_step(wiring.client, request)).verdict for _ in range(4)]
    assert verdicts == [
        RefundVerdict.RETRY,
        RefundVerdict.RETRY,
        RefundVerdict.PENDING,
        RefundVerdict.PENDING,
    ]
    assert len(wiring.fake.refunds) == 1
    assert wiring.fake.orders[out_trade_no_for(request.order_id)].refunded == request.amount_refund


async def test_a_settled_refund_is_refunded_by_notice_and_by_follow_up(wiring: Wiring) -> None:
    request = await _paid(wiring)
    step = await refund_step(wiring.client, request)
    assert step.verdict in (RefundVerdict.PENDING, RefundVerdict.REFUNDED)
    await eventually(lambda: len(wiring.receiver.notices) == 1)
    notice = wiring.receiver.notices[0]
    assert isinstance(notice, RefundNotice)
    assert verdict_of(notice.refund_status) is RefundVerdict.REFUNDED
    assert (await follow_up(wiring.client, request.out_refund_no)).verdict is RefundVerdict.REFUNDED
    again = await refund_step(wiring.client, request)
    assert again.verdict is RefundVerdict.REFUNDED and len(wiring.fake.refunds) == 1


async def test_an_abnormal_refund_needs_a_person(wiring: Wiring) -> None:
    wiring.fake.refund_outcome = "ABNORMAL"
    request = await _paid(wiring)
    await refund_step(wiring.client, request)
    await eventually(lambda: len(wiring.receiver.notices) == 1)
    assert (
        await follow_up(wiring.client, request.out_refund_no)
    ).verdict is RefundVerdict.ATTENTION


@pytest.mark.parametrize(
    ("status", "code", "verdict"),
    [
        (403, "NOT_ENOUGH", RefundVerdict.RETRY),
        (429, "FREQUENCY_LIMITED", RefundVerdict.RETRY),
        (500, "SYSTEM_ERROR", RefundVerdict.RETRY),
        (400, "PARAM_ERROR", RefundVerdict.ATTENTION),
        (403, "USER_ACCOUNT_ABNORMAL", RefundVerdict.ATTENTION),
    ],
)
async def test_a_refusal_is_retried_only_when_it_passes_by_itself(
    wiring: Wiring, status: int, code: str, verdict: RefundVerdict
) -> None:
    request = await _paid(wiring)
    wiring.fake.fail_next("refund", 1, status=status, code=code)
    assert (await refund_step(wiring.client, request)).verdict is verdict
    assert wiring.fake.refunds == {}, "a refused request refunds nothing"
    assert (await refund_step(wiring.client, request)).verdict in (
        RefundVerdict.PENDING,
        RefundVerdict.REFUNDED,
    )
    assert len(wiring.fake.refunds) == 1


async def test_following_up_a_refund_never_asked_for_needs_a_person(wiring: Wiring) -> None:
    step = await follow_up(wiring.client, "Rnever-asked")
    assert step.verdict is RefundVerdict.ATTENTION
