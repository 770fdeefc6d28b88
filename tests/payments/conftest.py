"""A local WeChat Pay on loopback, a merchant notify receiver, and a client wired to both.

Keys are generated at run time (never committed). The fake's retry schedule is compressed a
thousandfold, so WeChat's 15 s, 15 s, 30 s … become milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from seckill.payments.fake_wechatpay import FakeWechatPay, FakeWechatPayServer
from seckill.payments.provider import BadCallback, Notice, PaymentProvider, fail_body
from seckill.payments.wechatpay import WechatPay, WechatPayConfig

MCHID = "1900009191"
APPID = "wxd678efh567hg6787"
APIV3_KEY = b"0123456789abcdef0123456789ABCDEF"
MERCHANT_SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
PLATFORM_SERIAL = "PUB_KEY_ID_0119000091912025110100000001"
NEXT_PLATFORM_SERIAL = "PUB_KEY_ID_0119000091912026110100000002"
RETRY_SCALE = 0.001


@dataclasses.dataclass(frozen=True)
class Keys:
    merchant: rsa.RSAPrivateKey
    platform: rsa.RSAPrivateKey
    next_platform: rsa.RSAPrivateKey
    stranger: rsa.RSAPrivateKey  # nobody's registered key


@pytest.fixture(scope="session")
def keys() -> Keys:
    """RSA keys made for this run."""

    def new() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    return Keys(new(), new(), new(), new())


async def eventually(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait until ``condition()`` holds; fail after a generous deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class Receiver:
    """The merchant's notify endpoint as the gateway will answer it (204, or FAIL with 4xx/5xx)."""

    def __init__(self) -> None:
        self.provider: PaymentProvider | None = None
        self.notices: list[Notice] = []
        self.refused: list[BadCallback] = []
        self.answer_500 = 0  # answer the next N with 500 (our Redis is down, say)
        self.app = web.Application()
        self.app.router.add_post("/notify", self.handle)
        self.app.router.add_post("/refund-notify", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.answer_500:
            self.answer_500 -= 1
            return web.Response(status=500, body=fail_body("busy"), content_type="application/json")
        assert self.provider is not None
        try:
            notice = self.provider.verify_notice(request.headers, body)
        except BadCallback as exc:
            self.refused.append(exc)
            return web.Response(
                status=exc.status, body=fail_body(exc.message), content_type="application/json"
            )
        self.notices.append(notice)
        return web.Response(status=204)


@dataclasses.dataclass
class Wiring:
    fake: FakeWechatPay
    server: FakeWechatPayServer
    receiver: Receiver
    receiver_url: str
    client: WechatPay

    def config(self, **overrides: Any) -> WechatPayConfig:
        """The client's config with some fields replaced."""
        return dataclasses.replace(self.client.config, **overrides)


@pytest.fixture
async def wiring(keys: Keys) -> AsyncIterator[Wiring]:
    """Fake WeChat Pay + receiver on loopback, and a client wired to them."""
    receiver = Receiver()
    runner = web.AppRunner(receiver.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    fake = FakeWechatPay(
        mchid=MCHID,
        appid=APPID,
        apiv3_key=APIV3_KEY,
        merchant_public_keys={MERCHANT_SERIAL: keys.merchant.public_key()},
        platform_keys={PLATFORM_SERIAL: keys.platform, NEXT_PLATFORM_SERIAL: keys.next_platform},
        signing_serial=PLATFORM_SERIAL,
        retry_scale=RETRY_SCALE,
    )
    server = FakeWechatPayServer(fake)
    base_url = await server.start()
    config = WechatPayConfig(
        mchid=MCHID,
        appid=APPID,
        merchant_serial=MERCHANT_SERIAL,
        merchant_key=keys.merchant,
        apiv3_key=APIV3_KEY,
        public_keys={PLATFORM_SERIAL: keys.platform.public_key()},
        notify_url=f"{receiver_url}/notify",
        refund_notify_url=f"{receiver_url}/refund-notify",
        base_url=base_url,
        timeout_s=5.0,
        breaker_fail_max=3,
        breaker_reset_s=60.0,
    )
    client = WechatPay(config)
    receiver.provider = client
    try:
        yield Wiring(fake, server, receiver, receiver_url, client)
    finally:
        await client.aclose()
        await server.stop()
        await runner.cleanup()
