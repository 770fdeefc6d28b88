"""Whatever arrives at the notify URL, verify_notice answers a Notice or BadCallback, nothing else.

An unexpected exception there would be a 500 with the wrong body, and a crash path for anyone
who can reach the endpoint. Three depths: arbitrary headers and body (stopped at the headers),
an arbitrary body WeChat Pay really signed, and an arbitrary resource it really encrypted.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seckill.payments.provider import BadCallback, PaymentNotice, RefundNotice
from seckill.payments.wechatpay import WechatPay, WechatPayConfig
from tests.payments.conftest import APIV3_KEY, APPID, MCHID, PLATFORM_SERIAL, Keys

_HEADERS = ("Wechatpay-Timestamp", "Wechatpay-Nonce", "Wechatpay-Signature", "Wechatpay-Serial")
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    ["mchid", "appid", "out_trade_no", "transaction_id", "trade_state", "attach", "amount",
     "payer", "total", "refund", "out_refund_no", "refund_id", "refund_status", "openid",
     "success_time", "currency"]
)  # fmt: skip
_resource = st.recursive(
    st.none() | st.integers() | st.text(max_size=20),
    lambda inner: st.dictionaries(_field_names, inner, max_size=8),
    max_leaves=20,
)
_fuzz = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _client(keys: Keys) -> WechatPay:
    return WechatPay(
        WechatPayConfig(
            mchid=MCHID,
            appid=APPID,
            merchant_serial="5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
            merchant_key=keys.merchant,
            apiv3_key=APIV3_KEY,
            public_keys={PLATFORM_SERIAL: keys.platform.public_key()},
            notify_url="https://shop.example.com/notify",
        )
    )


def _signed(keys: Keys, body: bytes) -> dict[str, str]:
    timestamp, nonce = str(int(time.time())), "n0nce"
    signature = keys.platform.sign(
        f"{timestamp}\n{nonce}\n".encode() + body + b"\n", padding.PKCS1v15(), hashes.SHA256()
    )
    return dict(
        zip(
            _HEADERS,
            (timestamp, nonce, base64.b64encode(signature).decode(), PLATFORM_SERIAL),
            strict=True,
        )
    )


def _believed_or_refused(client: WechatPay, headers: dict[str, str], body: bytes) -> None:
    try:
        notice = client.verify_notice(headers, body)
    except BadCallback as exc:
        assert exc.status in (400, 401)
    else:
        assert isinstance(notice, (PaymentNotice, RefundNotice))


@_fuzz
@given(
    headers=st.dictionaries(
        st.sampled_from(_HEADERS) | st.text(max_size=10), st.text(max_size=60), max_size=6
    ),
    body=st.binary(max_size=200),
)
def test_arbitrary_headers_and_body(keys: Keys, headers: dict[str, str], body: bytes) -> None:
    _believed_or_refused(_client(keys), headers, body)


@_fuzz
@given(document=_json)
def test_an_arbitrary_body_signed_by_wechat_pay(keys: Keys, document: Any) -> None:
    body = json.dumps(document).encode()
    _believed_or_refused(_client(keys), _signed(keys, body), body)


@_fuzz
@given(
    resource=_resource,
    event_type=st.sampled_from(["TRANSACTION.SUCCESS", "REFUND.SUCCESS", "REFUND.ABNORMAL", "X"]),
)
def test_an_arbitrary_resource_encrypted_and_signed_by_wechat_pay(
    keys: Keys, resource: Any, event_type: str
) -> None:
    nonce = "0123456789ab"
    ciphertext = AESGCM(APIV3_KEY).encrypt(nonce.encode(), json.dumps(resource).encode(), b"t")
    body = json.dumps(
        {
            "id": "EV-1",
            "event_type": event_type,
            "resource": {
                "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": base64.b64encode(ciphertext).decode(),
                "nonce": nonce,
                "associated_data": "t",
            },
        }
    ).encode()
    _believed_or_refused(_client(keys), _signed(keys, body), body)
