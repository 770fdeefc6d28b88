"""WeChat Pay wired into the sale: the gateway, the order loops and the local WeChat Pay together.

Real Redis, a real store, the real gateway app on loopback, the local WeChat Pay over HTTP, and
the order service (writer, sweeper with its deadline settler, reconciler, refunder) running
with compressed schedules. Invariants:

- a payment is believed only when WeChat Pay signed it and the APIv3 key opens it; a refused
  notification changes nothing;
- one transaction pays one order once, whatever the duplicates and their order;
- a payer who paid before the deadline keeps the item even when the notification is lost;
- an order released at its deadline can no longer be paid at WeChat Pay (closed first);
- money taken for an order that had ended goes back once, however many tries it takes;
- WeChat Pay unreachable never stops expiries and loses nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from seckill import keys
from seckill import keys as keys_module
from seckill.auth import UserAuth
from seckill.embedded import free_port
from seckill.orders.service import OrderService
from seckill.payments.fake_wechatpay import FakeRefusal, FakeWechatPay, FakeWechatPayServer
from seckill.payments.wechatpay import WechatPay, WechatPayConfig, out_trade_no_for
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers
from tests.payments.conftest import (
    APIV3_KEY,
    APPID,
    MCHID,
    MERCHANT_SERIAL,
    NEXT_PLATFORM_SERIAL,
    PLATFORM_SERIAL,
    Keys,
    eventually,
)

PRICE = 1999
Client = TestClient[Any, Any]


@dataclasses.dataclass
class Sale:
    settings: Settings
    client: Client
    fake: FakeWechatPay
    fake_server: FakeWechatPayServer
    service: OrderService
    provider: WechatPay
    redis: redis.Redis
    keys: Keys

    def user(self, name: str, openid: str | None = None) -> dict[str, str]:
        token = UserAuth(self.settings.jwt.secret).mint(
            name, 600, openid=f"o-{name}" if openid is None else openid
        )
        return {"Authorization": f"Bearer {token}"}

    async def activity(self, **overrides: Any) -> str:
        fields: dict[str, Any] = {"price_cents": PRICE, "stock": 10, "payment_timeout_s": 900}
        body = activity_body(**{**fields, **overrides})
        response = await self.client.post(
            "/admin/v1/activities", json=body, headers=admin_headers(self.settings)
        )
        assert response.status == 201, await response.text()
        return str(body["id"])

    async def buy(self, activity_id: str, name: str) -> str:
        response = await self.client.post(
            f"/api/v1/activities/{activity_id}/orders",
            json={"quantity": 1},
            headers={**self.user(name), "Idempotency-Key": f"k-{name}"},
        )
        assert response.status == 202, await response.text()
        return str((await response.json())["order_id"])

    async def prepay(self, order_id: str, name: str) -> tuple[int, Any]:
        response = await self.client.post(
            f"/api/v1/orders/{order_id}/payment", headers=self.user(name)
        )
        return response.status, await response.json()

    async def status(self, order_id: str, name: str) -> str:
        response = await self.client.get(f"/api/v1/orders/{order_id}", headers=self.user(name))
        assert response.status == 200, await response.text()
        return str((await response.json())["status"])

    def counter(self, activity_id: str, name: str) -> int:
        return int(self.redis.hget(keys.counters(activity_id), name) or 0)

    async def report(self, activity_id: str) -> dict[str, Any]:
        response = await self.client.get(
            f"/admin/v1/activities/{activity_id}/report", headers=admin_headers(self.settings)
        )
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body

    async def notify(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        response = await self.client.post(
            "/api/v1/payments/wechat/notify",
            data=body,
            headers={**headers, "Content-Type": "application/json"},
        )
        return response.status, await response.read()


@contextlib.asynccontextmanager
async def open_sale(settings: Settings, keys_: Keys, **payment: float) -> AsyncIterator[Sale]:
    """The gateway, the order loops and the local WeChat Pay, wired; schedules compressed."""
    paced = {
        "deadline_backoff_s": 0.05,
        "deadline_backoff_max_s": 0.3,
        "hold_ceiling_s": 2.0,
        "reconcile_interval_s": 0.2,
        "reconcile_quiet_s": 60.0,
        "refund_interval_s": 0.05,
        "refund_backoff_max_s": 0.2,
        "refund_follow_up_s": 0.5,
    }
    paced.update(payment)
    settings = settings.replace("payment", **paced).replace("sweeper", interval_s=0.1)
    app = create_app(settings)
    client: Client = TestClient(TestServer(app))
    await client.start_server()
    gateway = str(client.make_url("")).rstrip("/")
    fake = FakeWechatPay(
        mchid=MCHID,
        appid=APPID,
        apiv3_key=APIV3_KEY,
        merchant_public_keys={MERCHANT_SERIAL: keys_.merchant.public_key()},
        platform_keys={PLATFORM_SERIAL: keys_.platform, NEXT_PLATFORM_SERIAL: keys_.next_platform},
        signing_serial=PLATFORM_SERIAL,
        retry_scale=0.001,
    )
    fake_server = FakeWechatPayServer(fake)
    base_url = await fake_server.start()
    provider = WechatPay(
        WechatPayConfig(
            mchid=MCHID,
            appid=APPID,
            merchant_serial=MERCHANT_SERIAL,
            merchant_key=keys_.merchant,
            apiv3_key=APIV3_KEY,
            public_keys={PLATFORM_SERIAL: keys_.platform.public_key()},
            notify_url=f"{gateway}/api/v1/payments/wechat/notify",
            base_url=base_url,
            timeout_s=2.0,
            breaker_fail_max=3,
            breaker_reset_s=0.3,
        )
    )
    services = app[SERVICES]
    services.wechatpay = provider
    service = OrderService(settings, services.redis, services.store, provider)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    sync = redis.Redis.from_url(settings.redis.url)
    try:
        yield Sale(settings, client, fake, fake_server, service, provider, sync, keys_)
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
        await client.close()
        await fake_server.stop()
        sync.close()


@pytest.fixture
async def sale(settings: Settings, keys: Keys) -> AsyncIterator[Sale]:
    async with open_sale(settings, keys) as opened:
        yield opened


def _verifies(sale: Sale, parameters: dict[str, str]) -> bool:
    message = "".join(
        f"{parameters[name]}\n" for name in ("appId", "timeStamp", "nonceStr", "package")
    ).encode()
    try:
        sale.keys.merchant.public_key().verify(
            base64.b64decode(parameters["paySign"]), message, padding.PKCS1v15(), hashes.SHA256()
        )
    except Exception:
        return False
    return True


def _signed(body: bytes, key: Any, serial: str, timestamp: int | None = None) -> dict[str, str]:
    ts, nonce = str(int(time.time()) if timestamp is None else timestamp), "N0NCE0123456789"
    signature = key.sign(
        f"{ts}\n{nonce}\n".encode() + body + b"\n", padding.PKCS1v15(), hashes.SHA256()
    )
    return {
        "Wechatpay-Timestamp": ts,
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": base64.b64encode(signature).decode(),
        "Wechatpay-Serial": serial,
    }


async def test_prepay_answers_parameters_the_merchant_key_signed_and_a_repeat_is_the_same(
    sale: Sale,
) -> None:
    activity_id = await sale.activity()
    order_id = await sale.buy(activity_id, "alice")
    status, first = await sale.prepay(order_id, "alice")
    assert status == 200, first
    assert set(first) == {"order_id", "prepay_id", "expires_at", "request_payment"}
    parameters = first["request_payment"]
    assert parameters["package"] == f"prepay_id={first['prepay_id']}"
    assert parameters["appId"] == APPID and parameters["signType"] == "RSA"
    assert _verifies(sale, parameters)
    placed = sale.fake.orders[out_trade_no_for(order_id)]
    assert placed.total == PRICE and placed.openid == "o-alice"
    order = await sale.client.get(f"/api/v1/orders/{order_id}", headers=sale.user("alice"))
    assert first["expires_at"] == (await order.json())["expires_at"]
    # WeChat's time_expire is the reservation's deadline (whole seconds, never after it)
    assert placed.expires_at <= time.time() + 900

    status, again = await sale.prepay(order_id, "alice")
    assert status == 200 and again["prepay_id"] == first["prepay_id"]
    assert _verifies(sale, again["request_payment"])
    assert sale.fake.calls["prepay"] == 1, "the stored prepay answers the repeat"


async def _held_notice(sale: Sale, order_id: str) -> bytes:
    """Pay the order at WeChat Pay and keep its notification from the gateway: its body."""
    sale.fake.faults.hold = True
    sale.fake.pay(out_trade_no_for(order_id))
    sale.fake.faults.hold = False
    assert len(sale.fake.held) == 1
    body = sale.fake.held.pop().body
    return body


def _reencrypted(body: bytes, *, aad: str | None = None, tamper: bool = False) -> bytes:
    document = json.loads(body)
    resource = document["resource"]
    if aad is not None:
        resource["associated_data"] = aad
    if tamper:
        raw = bytearray(base64.b64decode(resource["ciphertext"]))
        raw[3] ^= 0x01
        resource["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(document).encode()


async def test_a_notification_that_does_not_verify_is_refused_and_changes_nothing(
    sale: Sale,
) -> None:
    activity_id = await sale.activity()
    order_id = await sale.buy(activity_id, "alice")
    assert (await sale.prepay(order_id, "alice"))[0] == 200
    body = await _held_notice(sale, order_id)
    platform, other = sale.keys.platform, sale.keys.next_platform
    changes = sale.redis.xlen(keys.changes(activity_id))
    refused = {
        "bad signature": (body, _signed(body + b" ", platform, PLATFORM_SERIAL)),
        "old timestamp": (body, _signed(body, platform, PLATFORM_SERIAL, int(time.time()) - 600)),
        "another serial": (body, _signed(body, other, NEXT_PLATFORM_SERIAL)),
        "tampered ciphertext": (
            _reencrypted(body, tamper=True),
            _signed(_reencrypted(body, tamper=True), platform, PLATFORM_SERIAL),
        ),
        "wrong associated data": (
            _reencrypted(body, aad="refund"),
            _signed(_reencrypted(body, aad="refund"), platform, PLATFORM_SERIAL),
        ),
        "no headers": (body, {}),
    }
    for case, (raw, headers) in refused.items():
        status, answer = await sale.notify(raw, headers)
        assert 400 <= status < 600, case
        assert json.loads(answer)["code"] == "FAIL", case
        assert await sale.status(order_id, "alice") == "reserved", case
    assert sale.counter(activity_id, "paid") == 0
    assert sale.redis.xlen(keys.changes(activity_id)) == changes, "nothing recorded"

    status, answer = await sale.notify(body, _signed(body, platform, PLATFORM_SERIAL))
    assert (status, answer) == (204, b"")
    assert await sale.status(order_id, "alice") == "paid"


async def test_duplicate_and_reordered_notifications_pay_each_order_once(sale: Sale) -> None:
    activity_id = await sale.activity()
    first = await sale.buy(activity_id, "alice")
    second = await sale.buy(activity_id, "bob")
    for order_id, name in ((first, "alice"), (second, "bob")):
        assert (await sale.prepay(order_id, name))[0] == 200
    third = await sale.buy(activity_id, "cat")
    assert (await sale.prepay(third, "cat"))[0] == 200
    sale.fake.faults.hold = True
    sale.fake.pay(out_trade_no_for(first))
    sale.fake.pay(out_trade_no_for(second))
    sale.fake.faults.hold = False
    sale.fake.release_held(reverse=True)  # the second payment's notice arrives first
    sale.fake.faults.duplicate = True  # delivered twice at once
    sale.fake.pay(out_trade_no_for(third))
    await eventually(lambda: len(sale.fake.delivered("TRANSACTION.SUCCESS")) >= 4)
    for body in [n.body for n in sale.fake.notifications]:  # and every notice once more
        status, _ = await sale.notify(body, _signed(body, sale.keys.platform, PLATFORM_SERIAL))
        assert status == 204
    for order_id, name in ((first, "alice"), (second, "bob"), (third, "cat")):
        assert await sale.status(order_id, name) == "paid"
    assert sale.counter(activity_id, "paid") == 3 and sale.counter(activity_id, "reserved") == 0
    store = sale.service.writer.store

    async def recorded() -> list[tuple[str, str]]:
        return await store.payments(first)

    deadline = time.monotonic() + 20
    while len(await recorded()) < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert [result for _, result in await recorded()] == ["paid"], "one payment, once"


async def test_paid_a_second_before_the_deadline_with_the_notice_lost_ends_paid(
    sale: Sale,
) -> None:
    activity_id = await sale.activity(payment_timeout_s=3)
    order_id = await sale.buy(activity_id, "alice")
    status, _ = await sale.prepay(order_id, "alice")
    assert status == 200
    placed = sale.fake.orders[out_trade_no_for(order_id)]
    await asyncio.sleep(max(0.0, placed.expires_at - 1 - time.time()))
    sale.fake.faults.drop = 1  # the only notification is lost
    sale.fake.pay(out_trade_no_for(order_id))
    assert len(sale.fake.dropped) == 1
    await eventually(lambda: sale.counter(activity_id, "paid") == 1)
    assert await sale.status(order_id, "alice") == "paid"
    assert sale.counter(activity_id, "released") == 0, "never expired"
    assert sale.fake.calls["close"] == 0, "a paid order is never closed"
    assert sale.service.settler is not None and sale.service.settler.stats.paid == 1


async def test_an_order_released_at_its_deadline_can_no_longer_be_paid(sale: Sale) -> None:
    activity_id = await sale.activity(payment_timeout_s=2)
    order_id = await sale.buy(activity_id, "alice")
    status, prepaid = await sale.prepay(order_id, "alice")
    assert status == 200
    await eventually(lambda: sale.counter(activity_id, "released") == 1)
    assert await sale.status(order_id, "alice") == "expired"
    assert sale.fake.orders[out_trade_no_for(order_id)].state == "CLOSED", "closed first"
    with pytest.raises(FakeRefusal) as refused:
        sale.fake.pay(out_trade_no_for(order_id))
    assert refused.value.code == "ORDER_CLOSED"
    # the mini program, holding its parameters, is refused the same way
    async with ClientSession() as http:
        answer = await http.post(
            f"{sale.fake_server.url}/fake/request-payment",
            json={**prepaid["request_payment"], "openid": "o-alice"},
        )
        assert answer.status == 400 and (await answer.json())["code"] == "ORDER_CLOSED"
    assert sale.counter(activity_id, "paid") == 0


async def test_a_late_payment_is_refunded_once_even_when_the_refund_fails_twice_first(
    sale: Sale,
) -> None:
    await _late_payment_refunded_once(sale)


async def test_refunds_reach_postgresql_too(
    settings: Settings, keys: Keys, postgres_url: str
) -> None:
    """The same late payment with PostgreSQL as the store (schema v3 there, newest version)."""
    async with open_sale(settings.replace("database", url=postgres_url), keys) as sale:
        await _late_payment_refunded_once(sale)


async def _late_payment_refunded_once(sale: Sale) -> None:
    activity_id = await sale.activity()
    order_id = await sale.buy(activity_id, "alice")
    assert (await sale.prepay(order_id, "alice"))[0] == 200
    cancel = await sale.client.post(f"/api/v1/orders/{order_id}/cancel", headers=sale.user("alice"))
    assert cancel.status == 200
    sale.fake.fail_next("refund", 2)
    sale.fake.pay(out_trade_no_for(order_id))  # the payer paid anyway: too late
    await eventually(
        lambda: (
            json.loads(sale.redis.hget(keys.refunds(activity_id), order_id) or "{}").get("status")
            == "refunded"
        )
    )
    assert sale.fake.calls["refund"] == 3, "two failures, then the refund"
    assert len(sale.fake.refunds) == 1, "one refund, never two"
    refund = next(iter(sale.fake.refunds.values()))
    assert refund.amount_refund == PRICE and refund.out_refund_no == "R" + out_trade_no_for(
        order_id
    )
    assert await sale.status(order_id, "alice") == "cancelled"
    assert sale.counter(activity_id, "paid") == 0
    listed = await sale.client.get(
        f"/admin/v1/activities/{activity_id}/refunds", headers=admin_headers(sale.settings)
    )
    [shown] = (await listed.json())["refunds"]
    assert shown["status"] == "refunded" and shown["attempts"] == 2
    store = sale.service.writer.store
    deadline = time.monotonic() + 20
    while [r[1] for r in await store.refunds(activity_id)] != ["refunded"]:
        assert time.monotonic() < deadline, await store.refunds(activity_id)
        await asyncio.sleep(0.05)
    report = await sale.report(activity_id)
    assert report["refunds"]["refunded"] == 1 and report["refunds"]["owed_cents"] == 0


async def test_wechat_pay_unreachable_prepay_503_expiries_happen_nothing_lost(
    sale: Sale,
) -> None:
    activity_id = await sale.activity(payment_timeout_s=2, stock=3)
    held = await sale.buy(activity_id, "alice")
    assert (await sale.prepay(held, "alice"))[0] == 200
    reachable = sale.provider.config
    # WeChat Pay goes away (nothing listens there)
    sale.provider.config = dataclasses.replace(
        reachable, base_url=f"http://127.0.0.1:{free_port()}"
    )

    plain = await sale.buy(activity_id, "bob")
    status, body = await sale.prepay(plain, "bob")
    assert status == 503 and body["error"]["code"] == "payment_unavailable", body
    await eventually(lambda: sale.counter(activity_id, "released") == 1)
    assert await sale.status(plain, "bob") == "expired", "expiries go on without WeChat Pay"
    await asyncio.sleep(1.5)
    # the prepaid order keeps its stock until WeChat Pay has said nobody paid
    assert await sale.status(held, "alice") == "reserved"
    settler = sale.service.settler
    assert settler is not None and settler.held() == 1
    # held past [payment] hold_ceiling_s (2 s here): counted for the alert, still held
    await eventually(lambda: settler.over_ceiling() == 1)
    assert await sale.status(held, "alice") == "reserved"

    sale.provider.config = reachable  # back
    await eventually(lambda: sale.counter(activity_id, "released") == 2)
    assert await sale.status(held, "alice") == "expired"
    assert sale.fake.orders[out_trade_no_for(held)].state == "CLOSED"
    assert settler.held() == 0 and settler.over_ceiling() == 0
    assert sale.counter(activity_id, "reserved") == 0 and sale.counter(activity_id, "paid") == 0
    await _consistent(sale, activity_id)


async def _consistent(sale: Sale, activity_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        report = await sale.report(activity_id)
        if report["consistent"] and report["orders_pending_write"] == 0:
            return report
        assert time.monotonic() < deadline, report
        await asyncio.sleep(0.1)


async def test_bad_input_on_the_new_endpoints(sale: Sale) -> None:
    activity_id = await sale.activity()
    order_id = await sale.buy(activity_id, "alice")
    url = f"/api/v1/orders/{order_id}/payment"
    client = sale.client

    async def code(response: Any) -> tuple[int, str]:
        return response.status, (await response.json())["error"]["code"]

    assert await code(await client.post(url)) == (401, "unauthorized")
    alice = sale.user("alice")
    assert await code(await client.post(url, data=b"x" * 5000, headers=alice)) == (
        413,
        "payload_too_large",
    )
    assert await code(await client.post(url, data=b"[1]", headers=alice)) == (
        400,
        "invalid_request",
    )
    assert await code(await client.post(url, json={"amount": 1}, headers=alice)) == (
        400,
        "invalid_request",
    )
    assert await code(await client.post(url, headers=sale.user("alice", openid=""))) == (
        400,
        "invalid_request",
    )
    assert await code(await client.post(url, headers=sale.user("mallory"))) == (404, "not_found")
    assert await code(
        await client.post("/api/v1/orders/nope/payment", headers=sale.user("mallory"))
    ) == (
        404,
        "not_found",
    )
    assert await code(
        await client.post(
            f"/api/v1/orders/{activity_id}.{'0' * 20}/payment", headers=sale.user("mallory")
        )
    ) == (404, "not_found")
    await client.post(f"/api/v1/orders/{order_id}/cancel", headers=alice)
    assert await code(await client.post(url, headers=alice)) == (409, "not_payable")
    assert sale.fake.calls["prepay"] == 0, "nothing reached WeChat Pay"

    other = await sale.buy(activity_id, "bob")
    assert client.app is not None
    services = client.app[SERVICES]
    services.wechatpay = None
    try:
        status, body = await sale.prepay(other, "bob")
        assert status == 503 and body["error"]["code"] == "payment_unavailable"
    finally:
        services.wechatpay = sale.provider

    notify = "/api/v1/payments/wechat/notify"
    for raw, expected in ((b"x" * 5000, 413), (b"", 401), (b"{}", 401)):
        response = await client.post(notify, data=raw)
        assert response.status == expected
        assert (await response.json())["code"] == "FAIL"
    signed = _signed(b"not json", sale.keys.platform, PLATFORM_SERIAL)
    response = await client.post(notify, data=b"not json", headers=signed)
    assert response.status == 400 and (await response.json())["code"] == "FAIL"
    bogus = json.dumps({"id": "x", "event_type": "TRANSACTION.SUCCESS", "resource": {}}).encode()
    response = await client.post(
        notify, data=bogus, headers=_signed(bogus, sale.keys.platform, PLATFORM_SERIAL)
    )
    assert response.status == 400 and (await response.json())["code"] == "FAIL"

    refunds = f"/admin/v1/activities/{activity_id}/refunds"
    assert (await client.get(refunds)).status == 401
    admin = admin_headers(sale.settings)
    assert (await client.get(refunds + "?limit=0", headers=admin)).status == 400
    assert (await client.get(refunds + "?x=1", headers=admin)).status == 400
    assert (await client.get("/admin/v1/activities/nope/refunds", headers=admin)).status == 404
    assert sale.counter(activity_id, "paid") == 0


async def test_a_notice_for_another_merchant_or_amount_is_kept_never_paid(sale: Sale) -> None:
    activity_id = await sale.activity()
    order_id = await sale.buy(activity_id, "alice")
    assert (await sale.prepay(order_id, "alice"))[0] == 200
    body = await _held_notice(sale, order_id)
    document = json.loads(body)
    resource = document["resource"]
    plain = json.loads(
        AESGCM(APIV3_KEY).decrypt(
            resource["nonce"].encode(),
            base64.b64decode(resource["ciphertext"]),
            resource["associated_data"].encode(),
        )
    )
    for change in ({"mchid": "1900000999"}, {"amount": {"total": PRICE - 1, "currency": "CNY"}}):
        forged = {**plain, **change, "transaction_id": f"42000{len(str(change))}"}
        resource["ciphertext"] = base64.b64encode(
            AESGCM(APIV3_KEY).encrypt(
                resource["nonce"].encode(),
                json.dumps(forged).encode(),
                resource["associated_data"].encode(),
            )
        ).decode()
        raw = json.dumps(document).encode()
        status, _ = await sale.notify(raw, _signed(raw, sale.keys.platform, PLATFORM_SERIAL))
        assert status == 204, change  # handled: sending it again would not change it
        assert await sale.status(order_id, "alice") == "reserved", change
    assert sale.counter(activity_id, "paid") == 0
    kept: Any = sale.redis.xrange(keys.SUSPICIOUS_PAYMENTS)
    assert [fields[b"reason"] for _, fields in kept] == [b"not_our_merchant", b"amount_mismatch"]


async def test_a_small_sale_end_to_end_with_cancels_expiries_and_refunds(sale: Sale) -> None:
    """reserve → prepay → pay → notification → paid in the store, beside cancels, expiries
    (with and without a prepay) and a refund, and the report consistent at the end."""
    # 5 s to pay: a margin for a busy machine (the payers pay at once, the others expire)
    activity_id = await sale.activity(payment_timeout_s=5, stock=6)
    names = ["ann", "ben", "cat", "dan", "eve", "fay"]
    orders = {name: await sale.buy(activity_id, name) for name in names}
    prepaid: dict[str, Any] = {}
    for name in ("ann", "ben", "eve", "fay"):
        status, prepaid[name] = await sale.prepay(orders[name], name)
        assert status == 200
    async with ClientSession() as http:
        for name in ("ann", "ben"):  # the mini program pays with the parameters it was given
            answer = await http.post(
                f"{sale.fake_server.url}/fake/request-payment",
                json={**prepaid[name]["request_payment"], "openid": f"o-{name}"},
            )
            assert answer.status == 200, await answer.text()
    for name in ("cat", "fay"):
        response = await sale.client.post(
            f"/api/v1/orders/{orders[name]}/cancel", headers=sale.user(name)
        )
        assert response.status == 200
    sale.fake.pay(out_trade_no_for(orders["fay"]))  # paid after cancelling: refunded
    # dan never prepays, eve prepays and never pays: both expire
    await eventually(lambda: sale.counter(activity_id, "paid") == 2)
    await eventually(lambda: sale.counter(activity_id, "released") == 4)
    await eventually(
        lambda: (
            json.loads(sale.redis.hget(keys.refunds(activity_id), orders["fay"]) or "{}").get(
                "status"
            )
            == "refunded"
        )
    )
    expected = {
        "ann": "paid",
        "ben": "paid",
        "cat": "cancelled",
        "dan": "expired",
        "eve": "expired",
        "fay": "cancelled",
    }
    assert {name: await sale.status(orders[name], name) for name in names} == expected
    report = await _consistent(sale, activity_id)
    assert (report["paid"], report["released"], report["reserved"]) == (2, 4, 0)
    assert report["refunds"]["refunded"] == 1
    store = sale.service.writer.store
    deadline = time.monotonic() + 20
    while True:
        stored = {name: await store.order(orders[name]) for name in names}
        if all(r is not None and r.status == expected[n] for n, r in stored.items()):
            break
        assert time.monotonic() < deadline, stored
        await asyncio.sleep(0.1)
    assert sale.fake.orders[out_trade_no_for(orders["eve"])].state == "CLOSED"


def _cli(sale: Sale, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env["SECKILL_REDIS_URL"] = sale.settings.redis.url
    return subprocess.run(
        [sys.executable, "-m", "seckill", "refunds", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_an_abnormal_refund_waits_for_a_person_and_a_retry_keeps_its_number(
    sale: Sale,
) -> None:
    activity_id = await sale.activity()
    order_id = await sale.buy(activity_id, "alice")
    assert (await sale.prepay(order_id, "alice"))[0] == 200
    cancel = await sale.client.post(f"/api/v1/orders/{order_id}/cancel", headers=sale.user("alice"))
    assert cancel.status == 200
    sale.fake.refund_outcome = "ABNORMAL"  # the payer's account refused the money
    sale.fake.pay(out_trade_no_for(order_id))

    def status() -> str:
        raw = sale.redis.hget(keys.refunds(activity_id), order_id)
        return str(json.loads(raw or "{}").get("status"))

    await eventually(lambda: status() == "attention")
    # the notice may be delivered after the gateway learnt the outcome (the refund's answer)
    await eventually(lambda: len(sale.fake.delivered("REFUND.ABNORMAL")) >= 1)
    listed = await asyncio.to_thread(_cli, sale, "list", activity_id)
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    shown = json.loads(line)
    assert shown["status"] == "attention" and shown["order_id"] == order_id
    number = shown["out_refund_no"]
    report = await sale.report(activity_id)
    assert report["refunds"]["attention"] == 1 and report["refunds"]["owed_cents"] == PRICE

    calls = sale.fake.calls["refund"]
    retried = await asyncio.to_thread(_cli, sale, "retry", activity_id)
    assert retried.returncode == 0 and json.loads(retried.stdout)["retried"] == 1
    await eventually(lambda: sale.fake.calls["refund"] > calls)  # asked again
    await eventually(lambda: status() == "attention")
    assert list(sale.fake.refunds) == [number], "the same refund number, never a second refund"


async def test_the_reconciler_finds_a_lost_payment_and_closes_a_cancelled_order(
    settings: Settings, keys: Keys
) -> None:
    """主动查单: a payment whose notification was lost is found long before the deadline, and
    the WeChat order of a cancelled order is closed so nobody pays for nothing."""
    async with open_sale(settings, keys, reconcile_quiet_s=0.3) as sale:
        activity_id = await sale.activity()
        paid = await sale.buy(activity_id, "alice")
        cancelled = await sale.buy(activity_id, "bob")
        for order_id, name in ((paid, "alice"), (cancelled, "bob")):
            assert (await sale.prepay(order_id, name))[0] == 200
        response = await sale.client.post(
            f"/api/v1/orders/{cancelled}/cancel", headers=sale.user("bob")
        )
        assert response.status == 200
        sale.fake.faults.drop = 1
        sale.fake.pay(out_trade_no_for(paid))
        await eventually(lambda: sale.counter(activity_id, "paid") == 1)
        assert await sale.status(paid, "alice") == "paid"
        await eventually(lambda: sale.fake.orders[out_trade_no_for(cancelled)].state == "CLOSED")
        reconciler = sale.service.reconciler
        assert reconciler is not None
        # WeChat Pay shows CLOSED on the request, before the reconciler has its answer and counts
        await eventually(lambda: reconciler.stats.closed == 1)
        assert reconciler.stats.confirmed == 1 and reconciler.stats.closed == 1
        await eventually(lambda: sale.redis.hlen(keys_module.prepays(activity_id)) == 0)
