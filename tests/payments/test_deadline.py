"""At the deadline WeChat Pay decides: paid stays paid, unpaid is closed before release.

Invariants: a payer who paid before the deadline keeps the item even when the notification is
lost; stock is released only after WeChat Pay can no longer take money for the order (closed,
or never placed); a payment that lands between our query and our close is seen as paid; when
WeChat Pay cannot be asked, nothing is decided (RETRY) and nothing is closed.
"""

from __future__ import annotations

import time

import pytest

from seckill.embedded import free_port
from seckill.payments.deadline import Verdict, backoff_s, settle_at_deadline
from seckill.payments.fake_wechatpay import FakeRefusal
from seckill.payments.provider import PrepayOrder, QueryResult
from seckill.payments.wechatpay import WechatPay, out_trade_no_for
from tests.payments.conftest import Wiring

_serial = iter(range(10**6))


async def _prepaid(wiring: Wiring, expires_in_s: float = 900) -> PrepayOrder:
    order = PrepayOrder(
        order_id=f"dl{next(_serial)}.{'e5' * 10}",
        description="Phone",
        amount_total=199_900,
        payer_openid="oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
        expires_at_ms=int((time.time() + expires_in_s) * 1000),
    )
    await wiring.client.prepay(order)
    return order


async def test_paid_a_second_before_the_deadline_with_the_notice_lost_is_paid(
    wiring: Wiring,
) -> None:
    order = await _prepaid(wiring)
    wiring.fake.faults.drop = 1
    wiring.fake.pay(out_trade_no_for(order.order_id), at=order.expires_at_ms // 1000 - 1)
    settlement = await settle_at_deadline(wiring.client, order.order_id)
    assert settlement.verdict is Verdict.PAID
    assert settlement.query is not None and settlement.query.for_us
    assert settlement.query.amount_total == order.amount_total
    assert wiring.fake.calls["close"] == 0, "a paid order is never closed"
    assert wiring.receiver.notices == [] and len(wiring.fake.dropped) == 1


async def test_unpaid_is_closed_first_so_a_late_payment_is_refused(wiring: Wiring) -> None:
    order = await _prepaid(wiring)
    settlement = await settle_at_deadline(wiring.client, order.order_id)
    assert settlement.verdict is Verdict.UNPAID
    with pytest.raises(FakeRefusal) as refused:
        wiring.fake.pay(out_trade_no_for(order.order_id))
    assert refused.value.code == "ORDER_CLOSED"
    again = await settle_at_deadline(wiring.client, order.order_id)
    assert again.verdict is Verdict.UNPAID, "asking twice (two sweepers) decides the same"


class _PaysDuringTheClose(WechatPay):
    """The payer confirms in WeChat just after our query answered NOTPAY."""

    def __init__(self, wiring: Wiring) -> None:
        super().__init__(wiring.client.config)
        self.fake = wiring.fake

    async def query(self, order_id: str) -> QueryResult:
        result = await super().query(order_id)
        if result.trade_state == "NOTPAY":
            self.fake.pay(out_trade_no_for(order_id))
        return result


async def test_a_payment_between_query_and_close_is_paid(wiring: Wiring) -> None:
    order = await _prepaid(wiring)
    racing = _PaysDuringTheClose(wiring)
    try:
        settlement = await settle_at_deadline(racing, order.order_id)
    finally:
        await racing.aclose()
    assert settlement.verdict is Verdict.PAID
    assert wiring.fake.orders[out_trade_no_for(order.order_id)].state == "SUCCESS"


async def test_an_order_wechat_never_saw_is_unpaid(wiring: Wiring) -> None:
    settlement = await settle_at_deadline(wiring.client, f"ghost.{'f6' * 10}")
    assert settlement.verdict is Verdict.UNPAID


async def test_wechat_unreachable_decides_nothing(wiring: Wiring) -> None:
    order = await _prepaid(wiring)
    away = WechatPay(wiring.config(base_url=f"http://127.0.0.1:{free_port()}"))
    try:
        settlement = await settle_at_deadline(away, order.order_id)
    finally:
        await away.aclose()
    assert settlement.verdict is Verdict.RETRY and settlement.query is None
    assert wiring.fake.orders[out_trade_no_for(order.order_id)].state == "NOTPAY"


async def test_a_failed_close_keeps_the_stock_held_until_a_later_close_succeeds(
    wiring: Wiring,
) -> None:
    order = await _prepaid(wiring)
    wiring.fake.fail_next("close", 1)
    first = await settle_at_deadline(wiring.client, order.order_id)
    assert first.verdict is Verdict.RETRY
    assert wiring.fake.orders[out_trade_no_for(order.order_id)].state == "NOTPAY"
    second = await settle_at_deadline(wiring.client, order.order_id)
    assert second.verdict is Verdict.UNPAID
    assert wiring.fake.orders[out_trade_no_for(order.order_id)].state == "CLOSED"


def test_backoff_doubles_up_to_its_ceiling() -> None:
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_s(50) == 300.0 and backoff_s(10**9) == 300.0


async def test_a_close_refused_for_a_young_order_keeps_the_stock_held(wiring: Wiring) -> None:
    """Older WeChat Pay documents forbid closing in the first 5 minutes: a short reservation
    must then wait, never be released while WeChat Pay could still take the money."""
    order = await _prepaid(wiring)
    wiring.fake.close_min_age_s = 300.0
    refused = await settle_at_deadline(wiring.client, order.order_id)
    assert refused.verdict is Verdict.RETRY and "INVALID_REQUEST" in refused.reason
    wiring.fake.close_min_age_s = 0.0
    assert (await settle_at_deadline(wiring.client, order.order_id)).verdict is Verdict.UNPAID
