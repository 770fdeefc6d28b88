"""WechatPayConfig.from_env: files and SECKILL_WECHATPAY_* read at start, one clear line per fault.

Invariants: a merchant that is not fully configured never starts half-working; the secrets (the
APIv3 key, the merchant key) never show in an error, a repr or the start-up line; the trade
number derived from an order id is one WeChat Pay accepts and maps back to the order.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from seckill.payments.wechatpay import (
    OUT_REFUND_NO_PATTERN,
    OUT_TRADE_NO_PATTERN,
    WechatPayConfig,
    order_id_from,
    out_refund_no_for,
    out_trade_no_for,
    wechat_time,
)
from seckill.settings import SettingsError
from tests.payments.conftest import APIV3_KEY, Keys

SECRET = APIV3_KEY.decode()


def _pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _certificate(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0x7A1B)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def env(tmp_path: Path, keys: Keys) -> dict[str, str]:
    (tmp_path / "apiclient_key.pem").write_bytes(_pem_private(keys.merchant))
    (tmp_path / "pub_key.pem").write_bytes(_pem_public(keys.platform))
    return {
        "SECKILL_WECHATPAY_MCHID": "1900009191",
        "SECKILL_WECHATPAY_APPID": "wxd678efh567hg6787",
        "SECKILL_WECHATPAY_MERCHANT_SERIAL": "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
        "SECKILL_WECHATPAY_MERCHANT_KEY_FILE": str(tmp_path / "apiclient_key.pem"),
        "SECKILL_WECHATPAY_APIV3_KEY": SECRET,
        "SECKILL_WECHATPAY_PUBLIC_KEY_ID": "PUB_KEY_ID_0119000091912025110100000001",
        "SECKILL_WECHATPAY_PUBLIC_KEY_FILE": str(tmp_path / "pub_key.pem"),
        "SECKILL_WECHATPAY_NOTIFY_URL": "https://shop.example.com/api/v1/payments/wechat/notify",
    }


def test_a_complete_environment_loads_and_no_secret_shows(env: dict[str, str]) -> None:
    config = WechatPayConfig.from_env(env)
    assert config is not None
    assert config.mchid == "1900009191" and config.apiv3_key == APIV3_KEY
    assert list(config.public_keys) == ["PUB_KEY_ID_0119000091912025110100000001"]
    assert config.refund_url == config.notify_url
    assert config.base_url == "https://api.mch.weixin.qq.com"
    for text in (repr(config), config.describe()):
        assert SECRET not in text and "PRIVATE" not in text and "RSAPrivateKey" not in text


def test_nothing_set_means_wechat_pay_is_not_configured() -> None:
    assert WechatPayConfig.from_env({"SECKILL_REDIS_URL": "redis://x"}) is None


def test_a_certificate_directory_adds_keys_by_serial(
    env: dict[str, str], tmp_path: Path, keys: Keys
) -> None:
    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / "7A1B3C.pem").write_bytes(_certificate(keys.next_platform))
    env["SECKILL_WECHATPAY_PUBLIC_KEY_DIR"] = str(directory)
    config = WechatPayConfig.from_env(env)
    assert config is not None
    assert sorted(config.public_keys) == ["7A1B3C", "PUB_KEY_ID_0119000091912025110100000001"]


def _refusal(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as refused:
        WechatPayConfig.from_env(env)
    message = str(refused.value)
    assert "\n" not in message and SECRET not in message
    return message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "SECKILL_WECHATPAY_APIV3_KEY",
            SECRET[:31],
            "APIV3_KEY): must be exactly 32 bytes, got 31",
        ),
        ("SECKILL_WECHATPAY_MERCHANT_KEY_FILE", "/nonexistent/key.pem", "MERCHANT_KEY_FILE"),
        ("SECKILL_WECHATPAY_MCHID", "merchant", "SECKILL_WECHATPAY_MCHID"),
        ("SECKILL_WECHATPAY_APPID", "wx 1", "SECKILL_WECHATPAY_APPID"),
        ("SECKILL_WECHATPAY_NOTIFY_URL", "https://x.example/notify?a=1", "NOTIFY_URL"),
        ("SECKILL_WECHATPAY_NOTIFY_URL", "/relative", "NOTIFY_URL"),
        ("SECKILL_WECHATPAY_TIMEOUT_S", "soon", "TIMEOUT_S"),
        ("SECKILL_WECHATPAY_TIMEOUT_S", "0", "TIMEOUT_S"),
        ("SECKILL_WECHATPAY_PUBLIC_KEY_DIR", "/nonexistent/dir", "PUBLIC_KEY_DIR"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    env: dict[str, str], name: str, value: str, expected: str
) -> None:
    env[name] = value
    assert expected in _refusal(env)


@pytest.mark.parametrize(
    "name",
    ["SECKILL_WECHATPAY_APPID", "SECKILL_WECHATPAY_APIV3_KEY", "SECKILL_WECHATPAY_NOTIFY_URL"],
)
def test_a_missing_setting_is_named(env: dict[str, str], name: str) -> None:
    del env[name]
    assert name in _refusal(env)


def test_a_key_file_that_is_not_an_rsa_private_key_is_refused(
    env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "apiclient_key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    assert "MERCHANT_KEY_FILE" in _refusal(env)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "apiclient_key.pem").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert "not an RSA key" in _refusal(env)


def test_the_apiv3_key_can_come_from_a_file(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "apiv3").write_bytes(APIV3_KEY + b"\n")
    env["SECKILL_WECHATPAY_APIV3_KEY_FILE"] = str(tmp_path / "apiv3")
    assert "not both" in _refusal(env)
    del env["SECKILL_WECHATPAY_APIV3_KEY"]
    config = WechatPayConfig.from_env(env)
    assert config is not None and config.apiv3_key == APIV3_KEY


@pytest.mark.parametrize(
    "order_id",
    ["a.0123456789abcdef0123", "spring-26.0123456789abcdef0123", f"{'x' * 64}.{'f' * 20}"],
)
def test_every_order_id_has_a_trade_number_wechat_accepts(order_id: str) -> None:
    out_trade_no = out_trade_no_for(order_id)
    assert OUT_TRADE_NO_PATTERN.fullmatch(out_trade_no)
    assert out_trade_no_for(order_id) == out_trade_no, "derived, so a retry finds the same order"
    assert order_id_from(out_trade_no) in (order_id, None)
    assert OUT_REFUND_NO_PATTERN.fullmatch(out_refund_no_for(order_id))
    assert out_refund_no_for(order_id) == out_refund_no_for(order_id)


def test_a_short_order_id_maps_back_without_a_lookup() -> None:
    order_id = "spring26.0123456789abcdef0123"
    assert order_id_from(out_trade_no_for(order_id)) == order_id
    assert order_id_from(out_trade_no_for(f"{'x' * 64}.{'f' * 20}")) is None


def test_time_expire_is_written_as_wechat_writes_it_and_never_later_than_the_deadline() -> None:
    # 2026-11-25T14:00:00.999Z is 22:00:00 in China; the .999 is dropped, never rounded up
    assert wechat_time(1_795_615_200_999) == "2026-11-25T22:00:00+08:00"
