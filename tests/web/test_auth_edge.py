"""Credentials at the edge: every malformed one is a 401, JWT times are bounded, secrets and
URL passwords never reach a message, and no request can forge a log line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from seckill import settings as settings_module
from seckill.auth import AdminAuth, PaymentSignature, UserAuth
from seckill.cli import _Redacting
from seckill.errors import Unauthorized
from seckill.settings import Settings, SettingsError, redact
from seckill.web.app import create_app

SECRET = "s" * 40


def _token(**claims: Any) -> str:
    return "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")


def _user(auth: UserAuth, header: str) -> str | None:
    try:
        return auth.user_id(header)
    except Unauthorized:
        return None


def test_jwt_allows_clock_skew_within_the_leeway() -> None:
    auth = UserAuth(SECRET, leeway_s=30, max_lifetime_s=86_400)
    now = int(time.time())
    # a phone whose clock runs 3 s ahead issued it
    assert _user(auth, _token(sub="u", iat=now + 3, exp=now + 600)) == "u"
    assert _user(auth, _token(sub="u", nbf=now + 3, exp=now + 600)) == "u"
    assert _user(auth, _token(sub="u", exp=now - 10)) == "u", "expired within the leeway"
    assert _user(auth, _token(sub="u", exp=now - 120)) is None, "expired past the leeway"
    assert _user(auth, _token(sub="u", iat=now + 120, exp=now + 600)) is None


def test_jwt_lifetime_is_bounded() -> None:
    auth = UserAuth(SECRET, leeway_s=30, max_lifetime_s=86_400)
    now = int(time.time())
    assert _user(auth, _token(sub="u", iat=now, exp=now + 86_400)) == "u"
    assert _user(auth, _token(sub="u", iat=now, exp=now + 86_401)) is None
    assert _user(auth, _token(sub="u", exp=253_402_300_799)) is None, "year 9999, no iat"
    assert _user(auth, _token(sub="u", iat=now - 90_000, exp=now + 600)) is None


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "9999999999"},
        {"exp": str(int(time.time()) + 600)},
        {"exp": True},
        {"exp": [int(time.time()) + 600]},
        {"exp": int(time.time()) + 600, "iat": str(int(time.time()))},
        {"exp": int(time.time()) + 600, "nbf": "0"},
    ],
)
def test_jwt_times_must_be_numbers(claims: dict[str, Any]) -> None:
    auth = UserAuth(SECRET)
    assert _user(auth, _token(sub="u", **claims)) is None


def test_a_cached_token_is_not_kept_past_its_exp() -> None:
    auth = UserAuth(SECRET, leeway_s=0)
    exp = int(time.time()) + 2
    token = _token(sub="u", exp=exp)
    assert _user(auth, token) == "u"
    assert _user(auth, token) == "u", "answered from the cache"
    deadline = time.monotonic() + 30
    while time.time() <= exp + 0.5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _user(auth, token) is None, "the cache let an expired token through"


@pytest.mark.parametrize(
    "header",
    [
        "Bearer é.é.é",
        "Bearer \udcff\udcfe.\udcfd",  # what aiohttp hands over for non-UTF-8 bytes
        "Bearer " + "a" * 10_000,
        "Bearer \x00",
    ],
)
def test_a_malformed_user_token_is_unauthorized(header: str) -> None:
    assert _user(UserAuth(SECRET), header) is None


def _signature_refused(header: str | None, body: bytes = b"{}") -> bool:
    payments = PaymentSignature(SECRET, tolerance_s=300)
    try:
        payments.verify(header, body)
    except Unauthorized:
        return True
    return False


def test_payment_signature_shapes_are_checked_as_bytes() -> None:
    payments = PaymentSignature(SECRET, tolerance_s=300)
    now = int(time.time())
    good = payments.sign(b"{}", at=now)
    assert not _signature_refused(good)
    digest = good.split("v1=")[1]
    for header in [
        None,
        "",
        f"t={now},v1=" + "é" * 64,  # non-ASCII v1
        f"t={now},v1=\udcff\udcfe",  # non-UTF-8 bytes
        "t=" + "9" * 400 + f",v1={digest}",  # a 400-digit timestamp
        f"t=-{now},v1={digest}",
        f"t={now}.5,v1={digest}",
        f"v1={digest}",  # no t
        f"t={now}",  # no v1
        f"t={now},t={now},v1={digest}",  # two t
        f"t={now},v1={digest.upper()}",
        f"t={now}," + ",".join([f"v1={digest}"] * 5),  # too many candidates
        f"t={now},v1={digest}" + "," * 2000,  # oversized
        f"t={now - 301},v1={digest}",  # stale
    ]:
        assert _signature_refused(header), header
    assert _signature_refused(good, b"{ }"), "the body is signed"


def test_the_signature_header_is_checked_before_any_body() -> None:
    payments = PaymentSignature(SECRET, tolerance_s=300)
    with pytest.raises(Unauthorized):
        payments.check_header(f"t={int(time.time()) - 3600},v1={'0' * 64}")
    checked = payments.check_header(f"t={int(time.time())},v1={'0' * 64}")
    with pytest.raises(Unauthorized):
        payments.check_body(checked, b"{}")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer \udcff\udcfe", "Bearer ééé", "Bearer " + "t" * 40 + "\x00"]
)
def test_a_malformed_admin_header_is_unauthorized(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        AdminAuth("t" * 40).check(header)
    AdminAuth("t" * 40).check("Bearer " + "t" * 40)


def test_url_passwords_are_redacted_in_settings_errors() -> None:
    env = {
        "SECKILL_REDIS_URL": "http://shop:hunter2@10.0.0.5:6379/0",
        "SECKILL_DATABASE_URL": "mysql://orders:s3cr3t@db/orders",
    }
    with pytest.raises(SettingsError) as refused:
        settings_module.load(environ=env)
    assert "hunter2" not in str(refused.value) and "shop:***@" in str(refused.value)
    env["SECKILL_REDIS_URL"] = "redis://shop:hunter2@10.0.0.5:6379/0"
    with pytest.raises(SettingsError) as refused:
        settings_module.load(environ=env)
    assert "s3cr3t" not in str(refused.value) and "orders:***@" in str(refused.value)
    assert redact("redis://:pw@h:1/0 and postgresql://u:p@ss@h/db") == (
        "redis://:***@h:1/0 and postgresql://u:***@h/db"
    )
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def test_the_cli_and_its_log_redact_url_passwords(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env["SECKILL_DATABASE_URL"] = "oracle://orders:hunter2@db/orders"
    result = subprocess.run(
        [sys.executable, "-m", "seckill", "up", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "hunter2" not in result.stderr and "orders:***@" in result.stderr
    record = logging.LogRecord(
        "seckill", logging.ERROR, __file__, 1, "cannot reach %s", ("redis://a:hunter2@h/0",), None
    )
    assert (
        _Redacting(logging.Formatter("%(message)s")).format(record)
        == "cannot reach redis://a:***@h/0"
    )


async def test_an_unexpected_error_logs_one_escaped_line_and_few_tracebacks(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app.router.add_get("/boom/{tail}", boom, name="boom")
    caplog.set_level(logging.ERROR, logger="seckill.web.middlewares")
    async with TestClient(TestServer(app)) as client:
        for _ in range(3):
            response = await client.get("/boom/x%0aFORGED%0d%0aseckill%20ERROR%20forged")
            assert response.status == 500
            assert (await response.json())["error"]["code"] == "internal"
    records = [r for r in caplog.records if r.name == "seckill.web.middlewares"]
    assert len(records) == 3
    for record in records:
        assert "\n" not in record.getMessage() and "\r" not in record.getMessage()
        assert "\\n" in record.getMessage(), "the path is logged escaped"
    assert sum(r.exc_info is not None for r in records) == 1, "tracebacks are rate-limited"
