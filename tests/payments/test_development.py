"""One machine: a local WeChat Pay with fresh keys, and the merchant settings that match it.

Invariants: the settings written for the gateway load through the same from_env a real
merchant uses and talk to the local WeChat Pay end to end; the secrets are files only their
owner can read.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

from seckill.payments.fake_wechatpay import FakeWechatPayServer, development_setup
from seckill.payments.provider import PrepayOrder
from seckill.payments.wechatpay import WechatPay, WechatPayConfig, out_trade_no_for


async def test_the_written_settings_load_and_pay_against_the_local_wechat_pay(
    tmp_path: Path,
) -> None:
    setup = development_setup(retry_scale=0.001)
    server = FakeWechatPayServer(setup.fake)
    base_url = await server.start()
    env = setup.environment(tmp_path / "wechatpay", base_url, "http://127.0.0.1:9/notify")
    for name in ("SECKILL_WECHATPAY_MERCHANT_KEY_FILE", "SECKILL_WECHATPAY_APIV3_KEY_FILE"):
        assert stat.S_IMODE(Path(env[name]).stat().st_mode) == 0o600
    config = WechatPayConfig.from_env(env)
    assert config is not None
    client = WechatPay(config)
    try:
        order = PrepayOrder(
            order_id=f"dev.{'d4' * 10}",
            description="Phone",
            amount_total=100,
            payer_openid="o-dev-openid",
            expires_at_ms=int((time.time() + 600) * 1000),
        )
        prepay = await client.prepay(order)
        assert prepay.request_payment["appId"] == setup.fake.appid
        setup.fake.pay(out_trade_no_for(order.order_id))
        assert (await client.query(order.order_id)).paid
    finally:
        await client.aclose()
        await server.stop()
