"""WeChat Pay callback verification + decryption per second on one core (a plain loop).

Each round runs the gateway's whole callback check on a realistic TRANSACTION.SUCCESS:
headers, RSA-2048 PKCS#1 v1.5 SHA-256 signature, AEAD_AES_256_GCM decryption and reading the
transaction. Keys are generated at start. Usage: python benchmarks/wechatpay_verify.py [seconds]
"""

from __future__ import annotations

import base64
import json
import os
import platform
import secrets
import sys
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from seckill.payments.wechatpay import SignatureVerifier, WechatPay, WechatPayConfig

SERIAL = "PUB_KEY_ID_0119000091912025110100000001"
APIV3_KEY = secrets.token_hex(16).encode()


def _notification(platform_key: rsa.RSAPrivateKey, n: int) -> tuple[dict[str, str], bytes]:
    order_id = f"spring26.{n:020x}"
    resource = {
        "mchid": "1900009191",
        "appid": "wxd678efh567hg6787",
        "out_trade_no": order_id.replace(".", "*"),
        "transaction_id": f"42000009852026112{n:011d}",
        "trade_type": "JSAPI",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "bank_type": "OTHERS",
        "attach": order_id,
        "success_time": "2026-11-25T22:00:00+08:00",
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        "amount": {"total": 199900, "payer_total": 199900, "currency": "CNY"},
    }
    nonce = secrets.token_hex(6)
    ciphertext = AESGCM(APIV3_KEY).encrypt(
        nonce.encode(), json.dumps(resource, ensure_ascii=False).encode(), b"transaction"
    )
    body = json.dumps(
        {
            "id": f"EV-{n}",
            "create_time": "2026-11-25T22:00:01+08:00",
            "resource_type": "encrypt-resource",
            "event_type": "TRANSACTION.SUCCESS",
            "summary": "支付成功",
            "resource": {
                "original_type": "transaction",
                "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": base64.b64encode(ciphertext).decode(),
                "associated_data": "transaction",
                "nonce": nonce,
            },
        },
        ensure_ascii=False,
    ).encode()
    timestamp, header_nonce = str(int(time.time())), secrets.token_hex(16)
    signature = platform_key.sign(
        f"{timestamp}\n{header_nonce}\n".encode() + body + b"\n",
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    headers = {
        "Wechatpay-Timestamp": timestamp,
        "Wechatpay-Nonce": header_nonce,
        "Wechatpay-Signature": base64.b64encode(signature).decode(),
        "Wechatpay-Serial": SERIAL,
    }
    return headers, body


def _rate(
    label: str, seconds: float, work: list[tuple[dict[str, str], bytes]], step: object
) -> None:
    done, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for headers, body in work:
            step(headers, body)  # type: ignore[operator]
        done += len(work)
    elapsed = time.perf_counter() - started
    print(f"{label:<44} {done / elapsed:>10,.0f} /s  ({elapsed / done * 1e6:.1f} µs each)")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    platform_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    config = WechatPayConfig(
        mchid="1900009191",
        appid="wxd678efh567hg6787",
        merchant_serial="5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
        merchant_key=merchant,
        apiv3_key=APIV3_KEY,
        public_keys={SERIAL: platform_key.public_key()},
        notify_url="https://shop.example.com/api/v1/payments/wechat/notify",
    )
    client = WechatPay(config)
    work = [_notification(platform_key, n) for n in range(256)]
    verifier = SignatureVerifier(config.public_keys, config.timestamp_tolerance_s)
    print(f"python {platform.python_version()}, {platform.machine()}, one core, {seconds:g} s each")
    _rate("signature only (SignatureVerifier.verify)", seconds, work, verifier.verify)
    _rate("verify + decrypt + read (verify_notice)", seconds, work, client.verify_notice)


if __name__ == "__main__":
    main()
