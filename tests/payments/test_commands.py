"""WeChat Pay as a person runs it: `up --fake-wechatpay`, `refunds list|retry`, start-up checks.

Invariants: one command on one machine pays an order end to end through the local WeChat Pay;
a partly or wrongly configured merchant stops the process with one line naming the setting and
never prints a secret; a refund retried by ops keeps its refund number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from seckill import settings as settings_module
from seckill.auth import UserAuth
from tests.helpers import activity_body

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
SETTINGS = settings_module.load(environ={})


def _call(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else b"",
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _get(url: str, headers: dict[str, str]) -> Any:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_up_with_the_local_wechat_pay_pays_an_order_end_to_end(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "seckill", "up", "--port", "0", "--fake-wechatpay"],
        env=CLEAN_ENV,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("seckill serving on http://127.0.0.1:"), line
        url = line.split()[-1]
        env_file = tmp_path / "var" / "wechatpay" / "wechatpay.env"
        written = dict(row.split("=", 1) for row in env_file.read_text().splitlines() if "=" in row)
        fake_url = written["SECKILL_WECHATPAY_BASE_URL"]
        assert written["SECKILL_WECHATPAY_NOTIFY_URL"] == f"{url}/api/v1/payments/wechat/notify"
        admin = {"Authorization": f"Bearer {SETTINGS.admin.token}"}
        body = activity_body(id="wx1", price_cents=990)
        assert _call(f"{url}/admin/v1/activities", body, admin)[0] == 201
        user = {
            "Authorization": "Bearer "
            + UserAuth(SETTINGS.jwt.secret).mint("alice", 600, openid="o-alice")
        }
        status, order = _call(
            f"{url}/api/v1/activities/wx1/orders",
            {"quantity": 1},
            {**user, "Idempotency-Key": "k1"},
        )
        assert status == 202, order
        order_id = order["order_id"]
        status, prepay = _call(f"{url}/api/v1/orders/{order_id}/payment", None, user)
        assert status == 200, prepay
        status, paid = _call(
            f"{fake_url}/fake/request-payment", {**prepay["request_payment"], "openid": "o-alice"}
        )
        assert status == 200 and paid["trade_state"] == "SUCCESS", paid
        deadline = time.monotonic() + 30
        while _get(f"{url}/api/v1/orders/{order_id}", user)["status"] != "paid":
            assert time.monotonic() < deadline, "the notification reached the gateway"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0
    assert process.stderr is not None
    errors = process.stderr.read()
    assert "BEGIN" not in errors and "PRIVATE" not in errors, "no key in the log"


def test_a_partly_configured_merchant_stops_with_one_line_naming_the_setting(
    tmp_path: Path,
) -> None:
    env = {**CLEAN_ENV, "SECKILL_DEV": "1", "SECKILL_WECHATPAY_MCHID": "1900000001"}
    done = subprocess.run(
        [sys.executable, "-m", "seckill", "up", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("seckill:")]
    assert len(lines) == 1 and "SECKILL_WECHATPAY_APPID" in lines[0], done.stderr

    secret = "S3CRETS3CRETS3CRETS3CRETS3CRET12"
    key_file = tmp_path / "key.pem"
    key_file.write_text("not a key")
    env.update(
        SECKILL_WECHATPAY_APPID="wx0000000000000001",
        SECKILL_WECHATPAY_MERCHANT_SERIAL="ABC123",
        SECKILL_WECHATPAY_MERCHANT_KEY_FILE=str(key_file),
        SECKILL_WECHATPAY_APIV3_KEY=secret,
        SECKILL_WECHATPAY_NOTIFY_URL="https://example.com/api/v1/payments/wechat/notify",
    )
    done = subprocess.run(
        [sys.executable, "-m", "seckill", "up", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "SECKILL_WECHATPAY_MERCHANT_KEY_FILE" in done.stderr, done.stderr
    assert secret not in done.stderr and secret not in done.stdout
