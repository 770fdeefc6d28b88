"""WeChat Pay v3 client against the local WeChat Pay over real HTTP on loopback.

Invariants: a payment is only believed when WeChat Pay signed it and the APIv3 key opens it;
a retried or repeated call never pays, prepays or refunds twice; an order closed or past its
deadline cannot be paid; an unreachable WeChat Pay costs a quick ProviderUnavailable, then
nothing at all (the breaker), never a hang.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from seckill.embedded import free_port
from seckill.payments.fake_wechatpay import FakeRefusal
from seckill.payments.provider import (
    BadCallback,
    PaymentNotice,
    PrepayOrder,
    ProviderRefused,
    ProviderUnavailable,
    RefundNotice,
    RefundRequest,
)
from seckill.payments.wechatpay import WechatPay, out_trade_no_for
from tests.payments.conftest import (
    APIV3_KEY,
    APPID,
    MCHID,
    NEXT_PLATFORM_SERIAL,
    PLATFORM_SERIAL,
    Keys,
    Wiring,
    eventually,
)

_serial = iter(range(10**6))


def _order(total: int = 199_900, expires_in_s: float = 900, **overrides: Any) -> PrepayOrder:
    fields: dict[str, Any] = {
        "order_id": f"spring-{next(_serial)}.{'a1' * 10}",
        "description": "Phone (flash sale)",
        "amount_total": total,
        "payer_openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
        "expires_at_ms": int((time.time() + expires_in_s) * 1000),
    }
    fields.update(overrides)
    return PrepayOrder(**fields)


def _verifies(key: rsa.RSAPublicKey, signature_b64: str, message: bytes) -> bool:
    try:
        key.verify(base64.b64decode(signature_b64), message, padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True


def _headers(
    body: bytes, key: rsa.RSAPrivateKey, serial: str, timestamp: int | None = None
) -> dict[str, str]:
    """Wechatpay-* headers over ``body``, signed here (a third implementation of the recipe)."""
    ts, nonce = str(int(time.time()) if timestamp is None else timestamp), "5K8264ILTKCH16CQ2502"
    signature = key.sign(
        f"{ts}\n{nonce}\n".encode() + body + b"\n", padding.PKCS1v15(), hashes.SHA256()
    )
    return {
        "Wechatpay-Timestamp": ts,
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": base64.b64encode(signature).decode(),
        "Wechatpay-Serial": serial,
    }


def _transaction(order_id: str, total: int = 199_900, **overrides: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "mchid": MCHID,
        "appid": APPID,
        "out_trade_no": out_trade_no_for(order_id),
        "transaction_id": "4200000985202611251234567890",
        "trade_type": "JSAPI",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "bank_type": "OTHERS",
        "attach": order_id,
        "success_time": "2026-11-25T22:00:00+08:00",
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        "amount": {
            "total": total,
            "payer_total": total,
            "currency": "CNY",
            "payer_currency": "CNY",
        },
    }
    resource.update(overrides)
    return resource


def _notification(
    resource: dict[str, Any],
    *,
    associated_data: str = "transaction",
    encrypt_with: bytes = APIV3_KEY,
    event_type: str = "TRANSACTION.SUCCESS",
) -> bytes:
    nonce = "fdasflkja484"
    ciphertext = AESGCM(encrypt_with).encrypt(
        nonce.encode(), json.dumps(resource).encode(), associated_data.encode()
    )
    return json.dumps(
        {
            "id": "EV-2018022511223320873",
            "create_time": "2026-11-25T22:00:01+08:00",
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": "支付成功",
            "resource": {
                "original_type": "transaction",
                "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": base64.b64encode(ciphertext).decode(),
                "associated_data": associated_data,
                "nonce": nonce,
            },
        }
    ).encode()


# --- prepay and the mini program's parameters ------------------------------------------------


async def test_prepay_twice_gives_one_prepay_id_and_pay_sign_verifies_with_merchant_key(
    wiring: Wiring, keys: Keys
) -> None:
    order = _order()
    first = await wiring.client.prepay(order)
    second = await wiring.client.prepay(order)
    assert first.prepay_id == second.prepay_id, "a repeated prepay must not place a second order"
    assert len(wiring.fake.orders) == 1
    placed = wiring.fake.orders[first.out_trade_no]
    assert placed.request["attach"] == order.order_id
    assert placed.request["time_expire"].endswith("+08:00")
    params = first.request_payment
    assert params["appId"] == APPID and params["signType"] == "RSA"
    assert params["package"] == f"prepay_id={first.prepay_id}"
    message = f"{APPID}\n{params['timeStamp']}\n{params['nonceStr']}\n{params['package']}\n"
    assert _verifies(keys.merchant.public_key(), params["paySign"], message.encode())
    assert not _verifies(keys.stranger.public_key(), params["paySign"], message.encode())
    # a stored prepay id is re-signed locally, without asking WeChat Pay again
    calls = wiring.fake.calls["prepay"]
    again = wiring.client.pay_parameters(first.prepay_id)
    message = f"{APPID}\n{again['timeStamp']}\n{again['nonceStr']}\n{again['package']}\n"
    assert _verifies(keys.merchant.public_key(), again["paySign"], message.encode())
    assert wiring.fake.calls["prepay"] == calls


async def test_prepay_reusing_an_order_id_with_other_parameters_is_refused(wiring: Wiring) -> None:
    order = _order(total=100)
    await wiring.client.prepay(order)
    with pytest.raises(ProviderRefused) as refused:
        await wiring.client.prepay(_order(total=200, order_id=order.order_id))
    assert refused.value.code == "OUT_TRADE_NO_USED"


async def test_the_fake_refuses_a_request_signed_with_an_unregistered_merchant_key(
    wiring: Wiring, keys: Keys
) -> None:
    """The local WeChat Pay really checks our signatures, so the tests above mean something."""
    impostor = WechatPay(wiring.config(merchant_key=keys.stranger))
    try:
        with pytest.raises(ProviderRefused) as refused:
            await impostor.prepay(_order())
        assert refused.value.status == 401 and refused.value.code == "SIGN_ERROR"
    finally:
        await impostor.aclose()
    assert wiring.fake.orders == {}


# --- pay, notify, query, close ---------------------------------------------------------------


async def test_paying_sends_a_signed_encrypted_notice_that_verifies_and_decrypts(
    wiring: Wiring,
) -> None:
    order = _order(total=4_200)
    prepay = await wiring.client.prepay(order)
    # exactly what the gateway hands the mini program, as wx.requestPayment passes it on
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{wiring.server.url}/fake/request-payment", json=dict(prepay.request_payment)
        ) as response,
    ):
        assert response.status == 200, await response.text()
        transaction_id = (await response.json())["transaction_id"]
    await eventually(lambda: len(wiring.receiver.notices) == 1)
    notice = wiring.receiver.notices[0]
    assert isinstance(notice, PaymentNotice)
    assert notice.order_id == order.order_id
    assert notice.transaction_id == transaction_id
    assert notice.paid and notice.for_us
    assert notice.amount_total == 4_200 and notice.payer_openid == order.payer_openid
    assert notice.success_time is not None and notice.success_time.endswith("+08:00")
    assert wiring.receiver.refused == []


async def test_a_forged_pay_sign_does_not_pay(wiring: Wiring, keys: Keys) -> None:
    prepay = await wiring.client.prepay(_order())
    forged = dict(prepay.request_payment)
    message = "".join(f"{forged[k]}\n" for k in ("appId", "timeStamp", "nonceStr", "package"))
    forged["paySign"] = base64.b64encode(
        keys.stranger.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())
    ).decode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{wiring.server.url}/fake/pay/{prepay.out_trade_no}", json=forged) as response,
    ):
        assert response.status == 401
    assert (await wiring.client.query(prepay.order_id)).trade_state == "NOTPAY"


async def test_query_says_notpay_before_and_success_after_payment(wiring: Wiring) -> None:
    order = _order(total=500)
    await wiring.client.prepay(order)
    before = await wiring.client.query(order.order_id)
    assert before.trade_state == "NOTPAY" and not before.paid and not before.settled
    transaction_id = wiring.fake.pay(out_trade_no_for(order.order_id))
    after = await wiring.client.query(order.order_id)
    assert after.paid and after.trade_state == "SUCCESS"
    assert after.transaction_id == transaction_id and after.amount_total == 500
    assert after.payer_openid == order.payer_openid


async def test_query_of_an_order_wechat_never_saw_is_refused_not_unavailable(
    wiring: Wiring,
) -> None:
    with pytest.raises(ProviderRefused) as refused:
        await wiring.client.query(f"never.{'0' * 20}")
    assert refused.value.status == 404 and refused.value.code == "ORDER_NOT_EXIST"


async def test_a_closed_order_cannot_be_paid(wiring: Wiring) -> None:
    order = _order()
    await wiring.client.prepay(order)
    await wiring.client.close_order(order.order_id)
    await wiring.client.close_order(order.order_id)  # closing twice is harmless
    with pytest.raises(FakeRefusal) as refused:
        wiring.fake.pay(out_trade_no_for(order.order_id))
    assert refused.value.code == "ORDER_CLOSED"
    assert (await wiring.client.query(order.order_id)).trade_state == "CLOSED"
    with pytest.raises(ProviderRefused) as again:
        await wiring.client.prepay(order)
    assert again.value.code == "ORDER_CLOSED"


async def test_payment_is_taken_until_time_expire_and_refused_after(wiring: Wiring) -> None:
    late, in_time = _order(), _order()
    for order in (late, in_time):
        await wiring.client.prepay(order)
    deadline_s = in_time.expires_at_ms // 1000
    wiring.fake.pay(out_trade_no_for(in_time.order_id), at=deadline_s - 1)
    with pytest.raises(FakeRefusal) as refused:
        wiring.fake.pay(out_trade_no_for(late.order_id), at=late.expires_at_ms // 1000 + 1)
    assert refused.value.code == "ORDER_EXPIRED"
    assert (await wiring.client.query(in_time.order_id)).paid
    assert not (await wiring.client.query(late.order_id)).paid


async def test_closing_a_paid_order_is_refused_and_the_payment_stands(wiring: Wiring) -> None:
    order = _order()
    await wiring.client.prepay(order)
    wiring.fake.pay(out_trade_no_for(order.order_id))
    with pytest.raises(ProviderRefused) as refused:
        await wiring.client.close_order(order.order_id)
    assert refused.value.code == "ORDERPAID"
    assert (await wiring.client.query(order.order_id)).paid


# --- notifications that must not be believed -------------------------------------------------


def _valid(keys: Keys) -> tuple[dict[str, str], bytes]:
    body = _notification(_transaction(f"spring.{'b2' * 10}"))
    return _headers(body, keys.platform, PLATFORM_SERIAL), body


async def test_a_valid_hand_made_notice_is_believed(wiring: Wiring, keys: Keys) -> None:
    """The control for the refusals below: only the named defect makes them fail."""
    headers, body = _valid(keys)
    notice = wiring.client.verify_notice(headers, body)
    assert isinstance(notice, PaymentNotice) and notice.order_id == f"spring.{'b2' * 10}"


async def test_a_notice_for_another_merchant_or_app_is_not_for_us(
    wiring: Wiring, keys: Keys
) -> None:
    for other in ({"mchid": "1900000002"}, {"appid": "wx0000000000000009"}):
        body = _notification(_transaction(f"spring.{'b2' * 10}", **other))
        notice = wiring.client.verify_notice(_headers(body, keys.platform, PLATFORM_SERIAL), body)
        assert isinstance(notice, PaymentNotice) and not notice.for_us


async def test_the_order_is_named_by_the_trade_number_not_by_a_disagreeing_attach(
    wiring: Wiring, keys: Keys
) -> None:
    order_id = f"spring.{'b2' * 10}"
    body = _notification(_transaction(order_id, attach=f"other.{'c3' * 10}"))
    notice = wiring.client.verify_notice(_headers(body, keys.platform, PLATFORM_SERIAL), body)
    assert notice.order_id == order_id


def _bad_signature(keys: Keys) -> tuple[dict[str, str], bytes]:
    headers, body = _valid(keys)
    return headers, body.replace(b"EV-2018", b"EV-2019")  # the body changed after signing


def _signed_by_a_stranger(keys: Keys) -> tuple[dict[str, str], bytes]:
    _, body = _valid(keys)
    return _headers(body, keys.stranger, PLATFORM_SERIAL), body


def _old_timestamp(keys: Keys) -> tuple[dict[str, str], bytes]:
    _, body = _valid(keys)
    return _headers(body, keys.platform, PLATFORM_SERIAL, int(time.time()) - 301), body


def _future_timestamp(keys: Keys) -> tuple[dict[str, str], bytes]:
    _, body = _valid(keys)
    return _headers(body, keys.platform, PLATFORM_SERIAL, int(time.time()) + 301), body


def _unknown_serial(keys: Keys) -> tuple[dict[str, str], bytes]:
    # really signed by WeChat Pay's next key, but this merchant has not configured it yet
    _, body = _valid(keys)
    return _headers(body, keys.next_platform, NEXT_PLATFORM_SERIAL), body


def _tampered_ciphertext(keys: Keys) -> tuple[dict[str, str], bytes]:
    _, body = _valid(keys)
    document = json.loads(body)
    raw = bytearray(base64.b64decode(document["resource"]["ciphertext"]))
    raw[3] ^= 0x01
    document["resource"]["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    body = json.dumps(document).encode()
    return _headers(body, keys.platform, PLATFORM_SERIAL), body  # signed after tampering


def _wrong_associated_data(keys: Keys) -> tuple[dict[str, str], bytes]:
    body = _notification(_transaction(f"spring.{'b2' * 10}"), associated_data="refund")
    document = json.loads(body)
    document["resource"]["associated_data"] = "transaction"
    body = json.dumps(document).encode()
    return _headers(body, keys.platform, PLATFORM_SERIAL), body


def _other_apiv3_key(keys: Keys) -> tuple[dict[str, str], bytes]:
    body = _notification(_transaction(f"spring.{'b2' * 10}"), encrypt_with=b"x" * 32)
    return _headers(body, keys.platform, PLATFORM_SERIAL), body


def _header_defect(name: str, value: str | None) -> Any:
    def make(keys: Keys) -> tuple[dict[str, str], bytes]:
        headers, body = _valid(keys)
        if value is None:
            del headers[name]
        else:
            headers[name] = value
        return headers, body

    return make


def _not_json(keys: Keys) -> tuple[dict[str, str], bytes]:
    body = b"\xff\xfe not json"
    return _headers(body, keys.platform, PLATFORM_SERIAL), body


def _no_resource(keys: Keys) -> tuple[dict[str, str], bytes]:
    body = json.dumps({"id": "EV-1", "event_type": "TRANSACTION.SUCCESS"}).encode()
    return _headers(body, keys.platform, PLATFORM_SERIAL), body


def _resource_missing_amount(keys: Keys) -> tuple[dict[str, str], bytes]:
    resource = _transaction(f"spring.{'b2' * 10}")
    resource["amount"] = {"total": "199900"}
    body = _notification(resource)
    return _headers(body, keys.platform, PLATFORM_SERIAL), body


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (_bad_signature, 401),
        (_signed_by_a_stranger, 401),
        (_old_timestamp, 401),
        (_future_timestamp, 401),
        (_unknown_serial, 401),
        (_header_defect("Wechatpay-Signature", None), 401),
        (_header_defect("Wechatpay-Signature", "not base64!"), 401),
        (_header_defect("Wechatpay-Timestamp", "１７００"), 401),  # full-width digits
        (_header_defect("Wechatpay-Timestamp", "-1"), 401),
        (_header_defect("Wechatpay-Timestamp", "9" * 40), 401),
        (_header_defect("Wechatpay-Nonce", ""), 401),
        (_header_defect("Wechatpay-Serial", "x" * 5000), 401),
        (_tampered_ciphertext, 400),
        (_wrong_associated_data, 400),
        (_other_apiv3_key, 400),
        (_not_json, 400),
        (_no_resource, 400),
        (_resource_missing_amount, 400),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
async def test_a_notice_that_must_not_be_believed_is_bad_callback(
    wiring: Wiring, keys: Keys, make: Any, status: int
) -> None:
    headers, body = make(keys)
    with pytest.raises(BadCallback) as refused:
        wiring.client.verify_notice(headers, body)
    assert refused.value.status == status


async def test_the_notify_endpoint_answers_a_forgery_with_wechat_fail_body(
    wiring: Wiring, keys: Keys
) -> None:
    headers, body = _bad_signature(keys)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{wiring.receiver_url}/notify", data=body, headers=headers) as response,
    ):
        assert response.status == 401
        assert (await response.json())["code"] == "FAIL"
    assert wiring.receiver.notices == []


async def test_a_rotated_key_verifies_once_both_serials_are_configured(
    wiring: Wiring, keys: Keys
) -> None:
    both = {
        PLATFORM_SERIAL: keys.platform.public_key(),
        NEXT_PLATFORM_SERIAL: keys.next_platform.public_key(),
    }
    client = WechatPay(wiring.config(public_keys=both))
    try:
        wiring.fake.signing_serial = NEXT_PLATFORM_SERIAL
        order = _order()
        await client.prepay(order)  # the answer is signed with the next key
        headers, body = _unknown_serial(keys)
        assert isinstance(client.verify_notice(headers, body), PaymentNotice)
        with pytest.raises(ProviderUnavailable, match="not verified"):
            await wiring.client.query(order.order_id)  # this one only knows the old key
    finally:
        await client.aclose()


# --- callback delivery: retries, duplicates, order, loss -------------------------------------


async def test_a_notice_is_retried_on_the_schedule_until_answered(wiring: Wiring) -> None:
    wiring.receiver.answer_500 = 2
    order = _order()
    await wiring.client.prepay(order)
    wiring.fake.pay(out_trade_no_for(order.order_id))
    await eventually(lambda: len(wiring.receiver.notices) == 1)
    attempts = [(d.attempt, d.status) for d in wiring.fake.deliveries]
    assert attempts == [(1, 500), (2, 500), (3, 204)]


async def test_duplicated_notices_carry_the_same_id_and_transaction(wiring: Wiring) -> None:
    wiring.fake.faults.duplicate = True
    order = _order()
    await wiring.client.prepay(order)
    wiring.fake.pay(out_trade_no_for(order.order_id))
    await eventually(lambda: len(wiring.receiver.notices) == 2)
    first, second = wiring.receiver.notices
    assert isinstance(first, PaymentNotice) and isinstance(second, PaymentNotice)
    assert first.notice_id == second.notice_id
    assert first.transaction_id == second.transaction_id


async def test_held_notices_are_delivered_in_reverse_order(wiring: Wiring) -> None:
    wiring.fake.faults.hold = True
    orders = [_order(), _order(), _order()]
    for order in orders:
        await wiring.client.prepay(order)
        wiring.fake.pay(out_trade_no_for(order.order_id))
    assert wiring.receiver.notices == [] and len(wiring.fake.held) == 3
    wiring.fake.release_held()
    await eventually(lambda: len(wiring.receiver.notices) == 3)
    assert [n.order_id for n in wiring.receiver.notices] == [o.order_id for o in reversed(orders)]


async def test_a_delayed_notice_arrives_after_later_ones(wiring: Wiring) -> None:
    slow, quick = _order(), _order()
    for order in (slow, quick):
        await wiring.client.prepay(order)
    wiring.fake.faults.delay_s = 60.0
    wiring.fake.pay(out_trade_no_for(slow.order_id))
    wiring.fake.faults.delay_s = 0.0
    wiring.fake.pay(out_trade_no_for(quick.order_id))
    await eventually(lambda: len(wiring.receiver.notices) == 1)
    await asyncio.sleep(0.2)  # room for the slow one to overtake, were the delay ignored
    assert [n.order_id for n in wiring.receiver.notices] == [quick.order_id]


async def test_a_dropped_notice_never_arrives_but_the_query_finds_the_payment(
    wiring: Wiring,
) -> None:
    wiring.fake.faults.drop = 1
    lost, seen = _order(), _order()
    for order in (lost, seen):
        await wiring.client.prepay(order)
        wiring.fake.pay(out_trade_no_for(order.order_id))
    await eventually(lambda: len(wiring.receiver.notices) == 1)
    assert wiring.receiver.notices[0].order_id == seen.order_id
    assert len(wiring.fake.dropped) == 1
    assert (await wiring.client.query(lost.order_id)).paid


# --- refunds ---------------------------------------------------------------------------------


async def test_a_refund_fails_twice_then_happens_exactly_once(wiring: Wiring) -> None:
    order = _order(total=8_800)
    await wiring.client.prepay(order)
    transaction_id = wiring.fake.pay(out_trade_no_for(order.order_id))
    await eventually(lambda: len(wiring.receiver.notices) == 1)
    request = RefundRequest(
        order_id=order.order_id,
        out_refund_no=f"R{transaction_id}",
        amount_refund=8_800,
        amount_total=8_800,
        reason="paid after the reservation expired",
    )
    wiring.fake.fail_next("refund", 2)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await wiring.client.refund(request)
    first = await wiring.client.refund(request)
    again = await wiring.client.refund(request)
    assert first.refund_id == again.refund_id, "the same out_refund_no is the same refund"
    assert len(wiring.fake.refunds) == 1
    assert wiring.fake.orders[out_trade_no_for(order.order_id)].refunded == 8_800
    await eventually(lambda: len(wiring.receiver.notices) == 2)
    notice = wiring.receiver.notices[1]
    assert isinstance(notice, RefundNotice)
    assert notice.event_type == "REFUND.SUCCESS" and notice.refund_status == "SUCCESS"
    assert notice.order_id == order.order_id and notice.out_refund_no == request.out_refund_no
    assert notice.amount_refund == 8_800 and notice.for_us
    settled = await wiring.client.query_refund(request.out_refund_no)
    assert settled.status == "SUCCESS" and settled.refund_id == first.refund_id
    assert (await wiring.client.query(order.order_id)).trade_state == "REFUND"


async def test_an_abnormal_refund_is_notified_as_such(wiring: Wiring) -> None:
    wiring.fake.refund_outcome = "ABNORMAL"
    order = _order(total=300)
    await wiring.client.prepay(order)
    wiring.fake.faults.drop = 1  # the payment notice: not what this test is about
    transaction_id = wiring.fake.pay(out_trade_no_for(order.order_id))
    await wiring.client.refund(
        RefundRequest(order.order_id, f"R{transaction_id}", 300, 300, "late payment")
    )
    await eventually(lambda: len(wiring.receiver.notices) == 1)
    notice = wiring.receiver.notices[0]
    assert isinstance(notice, RefundNotice)
    assert notice.event_type == "REFUND.ABNORMAL" and notice.refund_status == "ABNORMAL"


async def test_refunding_an_unpaid_order_is_refused(wiring: Wiring) -> None:
    order = _order(total=300)
    await wiring.client.prepay(order)
    with pytest.raises(ProviderRefused) as refused:
        await wiring.client.refund(RefundRequest(order.order_id, "R-unpaid", 300, 300, "x"))
    assert refused.value.code == "INVALID_REQUEST"


# --- WeChat Pay away -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 429])
async def test_a_server_error_is_unavailable_not_refused(wiring: Wiring, status: int) -> None:
    order = _order()
    await wiring.client.prepay(order)
    wiring.fake.fail_next("query", 1, status=status)
    with pytest.raises(ProviderUnavailable):
        await wiring.client.query(order.order_id)
    assert (await wiring.client.query(order.order_id)).trade_state == "NOTPAY"


async def test_unreachable_wechat_pay_is_unavailable_and_opens_the_breaker(
    wiring: Wiring,
) -> None:
    client = WechatPay(wiring.config(base_url=f"http://127.0.0.1:{free_port()}"))
    try:
        for _ in range(3):
            with pytest.raises(ProviderUnavailable):
                await client.prepay(_order())
        assert client.breaker.state == "open"
        with pytest.raises(ProviderUnavailable, match="breaker is open"):
            await client.query(f"spring.{'c3' * 10}")
    finally:
        await client.aclose()


async def test_a_stalled_wechat_pay_times_out_and_an_open_breaker_stops_asking(
    wiring: Wiring,
) -> None:
    client = WechatPay(wiring.config(timeout_s=0.2))
    order = _order()
    try:
        await client.prepay(order)
        wiring.fake.stall_s = 1.5
        for _ in range(3):
            with pytest.raises(ProviderUnavailable):
                await client.query(order.order_id)
        assert client.breaker.state == "open"
        asked = wiring.fake.calls["query"]
        with pytest.raises(ProviderUnavailable, match="breaker is open"):
            await client.query(order.order_id)
        assert wiring.fake.calls["query"] == asked, "an open breaker never reaches WeChat Pay"
    finally:
        await client.aclose()


async def test_a_business_refusal_never_trips_the_breaker(wiring: Wiring) -> None:
    for _ in range(5):
        with pytest.raises(ProviderRefused):
            await wiring.client.query(f"never.{'0' * 20}")
    assert wiring.client.breaker.state == "closed"
