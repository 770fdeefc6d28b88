"""WeChat Pay API v3 for a direct merchant (JSAPI / mini program), behind PaymentProvider.

Outbound calls go through aiohttp with a timeout each and one breaker (the adapter in
``seckill.breakers``), so an unreachable WeChat Pay costs a failed call, then nothing, never
a blocked loop. Signing and verifying are done here with ``cryptography``: the
``wechatpayv3`` package is synchronous (requests), and the protocol is four small recipes:

- a request is signed over ``METHOD\\nPATH?QUERY\\ntimestamp\\nnonce\\nbody\\n`` with the
  merchant's RSA key and sent as ``Authorization: WECHATPAY2-SHA256-RSA2048 ...``;
- an answer or a notification is verified over ``timestamp\\nnonce\\nbody\\n`` with the
  WeChat Pay public key named by ``Wechatpay-Serial`` (several may be configured: rotation);
- a notification's resource is AEAD_AES_256_GCM under the APIv3 key;
- the mini program's ``wx.requestPayment`` is signed over
  ``appId\\ntimeStamp\\nnonceStr\\npackage\\n`` with the merchant key.

Our order ids (``<activity>.<20 hex>``, up to 85 characters with a dot) do not fit WeChat's
``out_trade_no`` (6-32 of ``[A-Za-z0-9_*-]``), so the trade number is derived from the order
id (``out_trade_no_for``) and the order id itself rides along in ``attach``, which WeChat
returns, signed and encrypted, in payment notifications and queries.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from yarl import URL

from seckill.breakers import AsyncBreaker, BreakerOpen
from seckill.keys import ORDER_ID_PATTERN
from seckill.payments.provider import (
    BadCallback,
    Notice,
    PaymentNotice,
    Prepay,
    PrepayOrder,
    ProviderRefused,
    ProviderUnavailable,
    QueryResult,
    RefundNotice,
    RefundRequest,
    RefundResult,
)
from seckill.settings import SettingsError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.mch.weixin.qq.com"
AUTH_SCHEMA = "WECHATPAY2-SHA256-RSA2048"
# WeChat writes its times in China Standard Time, with the offset spelled out
CHINA = timezone(timedelta(hours=8))

OUT_TRADE_NO_PATTERN = re.compile(r"[A-Za-z0-9_*-]{6,32}")
OUT_REFUND_NO_PATTERN = re.compile(r"[A-Za-z0-9_|*@-]{1,64}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEADER_MAX = 1024
_DESCRIPTION_MAX = 127
_USER_AGENT = "seckill/0.1 (WeChat Pay API v3)"

ENV_PREFIX = "SECKILL_WECHATPAY_"


def out_trade_no_for(order_id: str) -> str:
    """WeChat's trade number for one of our order ids: readable when it fits, a digest if not."""
    # '*' never occurs in an order id, so the readable form maps back without a lookup
    readable = order_id.replace(".", "*")
    if OUT_TRADE_NO_PATTERN.fullmatch(readable):
        return readable
    return "h" + hashlib.sha256(order_id.encode()).hexdigest()[:31]


def out_refund_no_for(order_id: str) -> str:
    """The refund number for an order's payment: derived, so a retried refund is the same one."""
    # WeChat Pay takes money for one out_trade_no at most once: one refund number per order
    return "R" + out_trade_no_for(order_id)


def order_id_from(out_trade_no: str) -> str | None:
    """Our order id for a readable trade number; None for a digest (use ``attach``)."""
    order_id = out_trade_no.replace("*", ".")
    return order_id if ORDER_ID_PATTERN.fullmatch(order_id) else None


def wechat_time(ms: int) -> str:
    """Epoch ms as WeChat writes a time: RFC 3339, whole seconds, +08:00."""
    # rounded down: WeChat then stops taking money at or before our deadline, never after
    return datetime.fromtimestamp(ms // 1000, tz=CHINA).isoformat()


def _nonce() -> str:
    return secrets.token_hex(16).upper()


def _sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


# --- configuration ---------------------------------------------------------------------------

_ENV_NAMES = {
    "mchid": "MCHID",
    "appid": "APPID",
    "merchant_serial": "MERCHANT_SERIAL",
    "merchant_key": "MERCHANT_KEY_FILE",
    "apiv3_key": "APIV3_KEY",
    "public_keys": "PUBLIC_KEY_FILE / SECKILL_WECHATPAY_PUBLIC_KEY_DIR",
    "notify_url": "NOTIFY_URL",
    "refund_notify_url": "REFUND_NOTIFY_URL",
    "base_url": "BASE_URL",
    "timeout_s": "TIMEOUT_S",
    "timestamp_tolerance_s": "TIMESTAMP_TOLERANCE_S",
    "breaker_fail_max": "BREAKER_FAIL_MAX",
    "breaker_reset_s": "BREAKER_RESET_S",
}


def _bad(field: str, why: str) -> SettingsError:
    return SettingsError(
        f"invalid setting wechatpay.{field} ({ENV_PREFIX}{_ENV_NAMES[field]}): {why}"
    )


def _check_url(field: str, url: str, *, query_allowed: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(field, f"expected an absolute http(s) URL, got {url!r}")
    if parts.query and not query_allowed:
        raise _bad(field, "WeChat Pay does not allow a query string here")


@dataclasses.dataclass(frozen=True, slots=True)
class WechatPayConfig:
    """A direct merchant's WeChat Pay v3 settings; the secrets never appear in repr."""

    mchid: str
    appid: str
    merchant_serial: str
    merchant_key: rsa.RSAPrivateKey = dataclasses.field(repr=False)
    apiv3_key: bytes = dataclasses.field(repr=False)
    # WeChat Pay public keys (or platform certificates' keys) by serial; several while rotating
    public_keys: Mapping[str, rsa.RSAPublicKey] = dataclasses.field(repr=False)
    notify_url: str
    refund_notify_url: str = ""  # empty: the same as notify_url
    base_url: str = DEFAULT_BASE_URL
    timeout_s: float = 5.0
    timestamp_tolerance_s: int = 300
    breaker_fail_max: int = 5
    breaker_reset_s: float = 30.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9]{1,32}", self.mchid):
            raise _bad("mchid", "expected the merchant id, 1-32 digits")
        if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", self.appid):
            raise _bad("appid", "expected the mini program's appid, e.g. wx1234567890abcdef")
        if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", self.merchant_serial):
            raise _bad("merchant_serial", "expected the merchant certificate's serial number")
        if (
            not isinstance(self.merchant_key, rsa.RSAPrivateKey)
            or self.merchant_key.key_size < 2048
        ):
            raise _bad("merchant_key", "expected an RSA private key of at least 2048 bits")
        if len(self.apiv3_key) != 32:
            raise _bad("apiv3_key", f"must be exactly 32 bytes, got {len(self.apiv3_key)}")
        if not self.public_keys:
            raise _bad("public_keys", "at least one WeChat Pay public key is needed")
        for serial, key in self.public_keys.items():
            if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", serial):
                raise _bad("public_keys", f"bad serial {serial!r}")
            if not isinstance(key, rsa.RSAPublicKey):
                raise _bad("public_keys", f"the key of serial {serial} is not an RSA public key")
        _check_url("notify_url", self.notify_url, query_allowed=False)
        if self.refund_notify_url:
            _check_url("refund_notify_url", self.refund_notify_url, query_allowed=False)
        _check_url("base_url", self.base_url, query_allowed=False)
        if not self.timeout_s > 0:
            raise _bad("timeout_s", "must be > 0")
        if self.timestamp_tolerance_s < 1:
            raise _bad("timestamp_tolerance_s", "must be >= 1")
        if self.breaker_fail_max < 1:
            raise _bad("breaker_fail_max", "must be >= 1")
        if not self.breaker_reset_s > 0:
            raise _bad("breaker_reset_s", "must be > 0")

    @property
    def refund_url(self) -> str:
        """Where refund notifications are sent."""
        return self.refund_notify_url or self.notify_url

    def describe(self) -> str:
        """One line for the start-up log: no secret in it."""
        return (
            f"WeChat Pay v3 mchid={self.mchid} appid={self.appid} "
            f"merchant_serial={self.merchant_serial} public_keys={sorted(self.public_keys)} "
            f"base_url={self.base_url}"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WechatPayConfig | None:
        """Read SECKILL_WECHATPAY_* and the files they name; None when none is set."""
        env = {
            k: v
            for k, v in (os.environ if environ is None else environ).items()
            if k.startswith(ENV_PREFIX) and v != ""
        }
        if not env:
            return None

        def need(field: str) -> str:
            name = ENV_PREFIX + _ENV_NAMES[field]
            if name not in env:
                raise SettingsError(f"missing setting {name} (WeChat Pay is partly configured)")
            return env[name]

        def number(field: str, default: float, kind: type[float] | type[int]) -> Any:
            raw = env.get(ENV_PREFIX + _ENV_NAMES[field])
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise _bad(
                    field, f"expected {'an integer' if kind is int else 'a number'}, got {raw!r}"
                ) from None

        return cls(
            mchid=need("mchid"),
            appid=need("appid"),
            merchant_serial=need("merchant_serial"),
            merchant_key=_load_private_key(need("merchant_key")),
            apiv3_key=_load_apiv3_key(env),
            public_keys=_load_public_keys(env),
            notify_url=need("notify_url"),
            refund_notify_url=env.get(ENV_PREFIX + "REFUND_NOTIFY_URL", ""),
            base_url=env.get(ENV_PREFIX + "BASE_URL", DEFAULT_BASE_URL).rstrip("/"),
            timeout_s=number("timeout_s", 5.0, float),
            timestamp_tolerance_s=number("timestamp_tolerance_s", 300, int),
            breaker_fail_max=number("breaker_fail_max", 5, int),
            breaker_reset_s=number("breaker_reset_s", 30.0, float),
        )


def _read(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _bad(field, f"cannot read {path}: {exc.strerror or exc}") from None


def _load_private_key(path: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(_read("merchant_key", path), password=None)
    except (ValueError, TypeError):
        # the library's message may quote the file; say only what is wrong with it
        raise _bad("merchant_key", f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise _bad("merchant_key", f"{path} is not an RSA key")
    return key


def _load_apiv3_key(env: Mapping[str, str]) -> bytes:
    inline, file = env.get(ENV_PREFIX + "APIV3_KEY"), env.get(ENV_PREFIX + "APIV3_KEY_FILE")
    if inline is not None and file is not None:
        raise _bad("apiv3_key", "set APIV3_KEY or APIV3_KEY_FILE, not both")
    if file is not None:
        key = _read("apiv3_key", file).strip()
    elif inline is not None:
        key = inline.encode()
    else:
        raise SettingsError(
            f"missing setting {ENV_PREFIX}APIV3_KEY (or {ENV_PREFIX}APIV3_KEY_FILE)"
        )
    if len(key) != 32:
        raise _bad("apiv3_key", f"must be exactly 32 bytes, got {len(key)}")
    return key


def _load_public_key(path: Path) -> rsa.RSAPublicKey:
    data = _read("public_keys", str(path))
    try:
        if b"BEGIN CERTIFICATE" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise _bad("public_keys", f"{path} is not a PEM public key or certificate") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise _bad("public_keys", f"{path} is not an RSA key")
    return key


def _load_public_keys(env: Mapping[str, str]) -> dict[str, rsa.RSAPublicKey]:
    keys: dict[str, rsa.RSAPublicKey] = {}
    key_id, key_file = (
        env.get(ENV_PREFIX + "PUBLIC_KEY_ID"),
        env.get(ENV_PREFIX + "PUBLIC_KEY_FILE"),
    )
    if (key_id is None) != (key_file is None):
        raise _bad("public_keys", "PUBLIC_KEY_ID and PUBLIC_KEY_FILE go together")
    if key_id is not None and key_file is not None:
        keys[key_id] = _load_public_key(Path(key_file))
    directory = env.get(ENV_PREFIX + "PUBLIC_KEY_DIR")
    if directory is not None:
        # one <serial>.pem per WeChat Pay public key or platform certificate
        try:
            files = sorted(Path(directory).glob("*.pem"))
        except OSError as exc:
            raise _bad("public_keys", f"cannot list {directory}: {exc.strerror or exc}") from None
        if not files and not Path(directory).is_dir():
            raise _bad("public_keys", f"{directory} is not a directory")
        for file in files:
            keys[file.stem] = _load_public_key(file)
    if not keys:
        raise SettingsError(
            f"missing setting {ENV_PREFIX}PUBLIC_KEY_ID + {ENV_PREFIX}PUBLIC_KEY_FILE "
            f"or {ENV_PREFIX}PUBLIC_KEY_DIR (WeChat Pay's public keys)"
        )
    return keys


# --- verification ----------------------------------------------------------------------------


class SignatureVerifier:
    """Checks ``Wechatpay-*`` headers over a body; BadCallback for anything short of valid."""

    def __init__(
        self,
        public_keys: Mapping[str, rsa.RSAPublicKey],
        tolerance_s: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = dict(public_keys)
        self._tolerance_s = tolerance_s
        self._clock = clock

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """The serial whose key signed ``body``; BadCallback otherwise."""
        given = {name.lower(): value for name, value in headers.items()}
        fields = []
        for name in ("timestamp", "nonce", "signature", "serial"):
            value = given.get(f"wechatpay-{name}")
            if not value or len(value) > _HEADER_MAX:
                raise BadCallback(f"missing or oversized Wechatpay-{name.capitalize()} header")
            fields.append(value.strip())
        timestamp, nonce, signature, serial = fields
        if not _TIMESTAMP.fullmatch(timestamp):
            raise BadCallback("malformed Wechatpay-Timestamp")
        # a captured notification replayed later is refused even with a valid signature
        if abs(self._clock() - int(timestamp)) > self._tolerance_s:
            raise BadCallback("Wechatpay-Timestamp outside the tolerance")
        key = self._keys.get(serial)
        if key is None:
            raise BadCallback("unknown Wechatpay-Serial")
        try:
            raw_signature = base64.b64decode(signature, validate=True)
            message = f"{timestamp}\n{nonce}\n".encode() + body + b"\n"
        except (binascii.Error, ValueError, UnicodeError):
            raise BadCallback("malformed Wechatpay-Signature or Wechatpay-Nonce") from None
        try:
            key.verify(raw_signature, message, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise BadCallback("Wechatpay-Signature does not match") from None
        return serial


def decrypt_resource(apiv3_key: bytes, resource: Any) -> bytes:
    """The plaintext of a notification's resource; BadCallback(400) if it does not decrypt."""
    if not isinstance(resource, dict):
        raise BadCallback("resource must be an object", status=400)
    if resource.get("algorithm") != "AEAD_AES_256_GCM":
        raise BadCallback("resource.algorithm must be AEAD_AES_256_GCM", status=400)
    ciphertext, nonce = resource.get("ciphertext"), resource.get("nonce")
    associated = resource.get("associated_data", "")
    if not (isinstance(ciphertext, str) and isinstance(nonce, str) and isinstance(associated, str)):
        raise BadCallback(
            "resource needs ciphertext, nonce and associated_data strings", status=400
        )
    try:
        return AESGCM(apiv3_key).decrypt(
            nonce.encode(), base64.b64decode(ciphertext, validate=True), associated.encode() or None
        )
    except (InvalidTag, ValueError, binascii.Error, UnicodeError):
        raise BadCallback("resource does not decrypt with the APIv3 key", status=400) from None


class _Shape(ValueError):
    """A field of a WeChat document is missing or of the wrong type."""


def _text(doc: Mapping[str, Any], name: str, *, optional: bool = False) -> str:
    value = doc.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise _Shape(f"{name} must be a string")
    return value


def _int(doc: Mapping[str, Any], name: str, *, optional: bool = False) -> int:
    value = doc.get(name)
    if value is None and optional:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Shape(f"{name} must be an integer")
    return value


def _object(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise _Shape(f"{name} must be an object")
    return value


def _order_id(out_trade_no: str, attach: str) -> str | None:
    # attach is trusted only when it names the order the trade number was derived from
    if attach and out_trade_no_for(attach) == out_trade_no:
        return attach
    return order_id_from(out_trade_no)


# --- the client ------------------------------------------------------------------------------


class WechatPay:
    """PaymentProvider for WeChat Pay API v3 (direct merchant, JSAPI / mini program)."""

    name = "wechatpay"

    def __init__(
        self,
        config: WechatPayConfig,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.verifier = SignatureVerifier(config.public_keys, config.timestamp_tolerance_s, clock)
        # business refusals are answers, not faults: only ProviderUnavailable trips it
        self.breaker = AsyncBreaker(
            "payment:wechatpay",
            fail_max=config.breaker_fail_max,
            reset_timeout_s=config.breaker_reset_s,
            failures=(ProviderUnavailable,),
        )

    async def aclose(self) -> None:
        """Close the HTTP session if this client opened it."""
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    # -- PaymentProvider

    async def prepay(self, order: PrepayOrder) -> Prepay:
        """Place the JSAPI order; WeChat answers the same prepay_id for the same parameters."""
        if isinstance(order.amount_total, bool) or order.amount_total < 1:
            raise ValueError("amount_total must be a positive number of fen")
        if not order.payer_openid:
            raise ValueError("payer_openid is required for a JSAPI payment")
        out_trade_no = out_trade_no_for(order.order_id)
        payload = {
            "appid": self.config.appid,
            "mchid": self.config.mchid,
            "description": order.description[:_DESCRIPTION_MAX] or order.order_id,
            "out_trade_no": out_trade_no,
            "time_expire": wechat_time(order.expires_at_ms),
            "attach": order.order_id,
            "notify_url": self.config.notify_url,
            "amount": {"total": order.amount_total, "currency": "CNY"},
            "payer": {"openid": order.payer_openid},
        }
        answer = await self._call("POST", "/v3/pay/transactions/jsapi", payload)
        prepay_id = answer.get("prepay_id")
        if not isinstance(prepay_id, str) or not prepay_id:
            raise ProviderUnavailable("WeChat Pay answered a prepay without prepay_id")
        return Prepay(order.order_id, out_trade_no, prepay_id, self.pay_parameters(prepay_id))

    def pay_parameters(self, prepay_id: str) -> dict[str, str]:
        """``wx.requestPayment``'s parameters for a prepay id, signed with the merchant key."""
        app_id, time_stamp, nonce_str = self.config.appid, str(int(self._clock())), _nonce()
        package = f"prepay_id={prepay_id}"
        message = f"{app_id}\n{time_stamp}\n{nonce_str}\n{package}\n".encode()
        return {
            "appId": app_id,
            "timeStamp": time_stamp,
            "nonceStr": nonce_str,
            "package": package,
            "signType": "RSA",
            "paySign": _sign(self.config.merchant_key, message),
        }

    def verify_notice(self, headers: Mapping[str, str], body: bytes) -> Notice:
        """Verify the signature, decrypt the resource and read the notice; BadCallback if not."""
        self.verifier.verify(headers, body)
        try:
            document = json.loads(body)
        except (ValueError, UnicodeError):
            raise BadCallback("body is not JSON", status=400) from None
        if not isinstance(document, dict):
            raise BadCallback("body must be a JSON object", status=400)
        plaintext = decrypt_resource(self.config.apiv3_key, document.get("resource"))
        try:
            resource = json.loads(plaintext)
            if not isinstance(resource, dict):
                raise _Shape("resource must be an object")
            notice_id, event_type = _text(document, "id"), _text(document, "event_type")
            if event_type.startswith("TRANSACTION."):
                return self._payment_notice(notice_id, event_type, resource)
            if event_type.startswith("REFUND."):
                return self._refund_notice(notice_id, event_type, resource)
        except (_Shape, ValueError, UnicodeError) as exc:
            raise BadCallback(f"malformed notification: {exc}", status=400) from None
        raise BadCallback(f"unexpected event_type {event_type[:40]!r}", status=400)

    async def query(self, order_id: str) -> QueryResult:
        """Ask WeChat Pay about the order (主动查单)."""
        out_trade_no = out_trade_no_for(order_id)
        answer = await self._call(
            "GET",
            f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no, safe='*')}"
            f"?mchid={self.config.mchid}",
        )
        try:
            amount = _object(answer, "amount")
            mchid, appid = _text(answer, "mchid"), _text(answer, "appid")
            return QueryResult(
                order_id=order_id,
                out_trade_no=_text(answer, "out_trade_no"),
                trade_state=_text(answer, "trade_state"),
                transaction_id=_text(answer, "transaction_id", optional=True) or None,
                amount_total=_int(amount, "total") if "total" in amount else None,
                payer_openid=_text(_object(answer, "payer"), "openid", optional=True) or None,
                mchid=mchid,
                appid=appid,
                success_time=_text(answer, "success_time", optional=True) or None,
                for_us=mchid == self.config.mchid and appid == self.config.appid,
            )
        except _Shape as exc:
            raise ProviderUnavailable(f"WeChat Pay answered a malformed query: {exc}") from None

    async def close_order(self, order_id: str) -> None:
        """Close the WeChat order so it can no longer be paid (关单)."""
        out_trade_no = out_trade_no_for(order_id)
        await self._call(
            "POST",
            f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no, safe='*')}/close",
            {"mchid": self.config.mchid},
        )

    async def refund(self, request: RefundRequest) -> RefundResult:
        """Ask for a refund; WeChat keys it by out_refund_no, so a retry refunds once."""
        if not OUT_REFUND_NO_PATTERN.fullmatch(request.out_refund_no):
            raise ValueError("out_refund_no must be 1-64 of [A-Za-z0-9_|*@-]")
        payload = {
            "out_trade_no": out_trade_no_for(request.order_id),
            "out_refund_no": request.out_refund_no,
            "reason": request.reason[:80],
            "notify_url": self.config.refund_url,
            "amount": {
                "refund": request.amount_refund,
                "total": request.amount_total,
                "currency": "CNY",
            },
        }
        return self._refund_result(await self._call("POST", "/v3/refund/domestic/refunds", payload))

    async def query_refund(self, out_refund_no: str) -> RefundResult:
        """Ask WeChat Pay about a refund."""
        if not OUT_REFUND_NO_PATTERN.fullmatch(out_refund_no):
            raise ValueError("out_refund_no must be 1-64 of [A-Za-z0-9_|*@-]")
        path = f"/v3/refund/domestic/refunds/{quote(out_refund_no, safe='*|@')}"
        return self._refund_result(await self._call("GET", path))

    # -- reading WeChat's documents

    def _payment_notice(
        self, notice_id: str, event_type: str, resource: Mapping[str, Any]
    ) -> PaymentNotice:
        amount = _object(resource, "amount")
        out_trade_no, mchid, appid = (
            _text(resource, "out_trade_no"),
            _text(resource, "mchid"),
            _text(resource, "appid"),
        )
        return PaymentNotice(
            notice_id=notice_id,
            event_type=event_type,
            order_id=_order_id(out_trade_no, _text(resource, "attach", optional=True)),
            out_trade_no=out_trade_no,
            transaction_id=_text(resource, "transaction_id"),
            trade_state=_text(resource, "trade_state"),
            amount_total=_int(amount, "total"),
            currency=_text(amount, "currency", optional=True) or "CNY",
            payer_openid=_text(_object(resource, "payer"), "openid", optional=True),
            mchid=mchid,
            appid=appid,
            success_time=_text(resource, "success_time", optional=True) or None,
            for_us=mchid == self.config.mchid and appid == self.config.appid,
        )

    def _refund_notice(
        self, notice_id: str, event_type: str, resource: Mapping[str, Any]
    ) -> RefundNotice:
        amount = _object(resource, "amount")
        out_trade_no, mchid = _text(resource, "out_trade_no"), _text(resource, "mchid")
        return RefundNotice(
            notice_id=notice_id,
            event_type=event_type,
            order_id=order_id_from(out_trade_no),
            out_trade_no=out_trade_no,
            transaction_id=_text(resource, "transaction_id"),
            out_refund_no=_text(resource, "out_refund_no"),
            refund_id=_text(resource, "refund_id"),
            refund_status=_text(resource, "refund_status"),
            amount_refund=_int(amount, "refund"),
            amount_total=_int(amount, "total"),
            mchid=mchid,
            success_time=_text(resource, "success_time", optional=True) or None,
            for_us=mchid == self.config.mchid,
        )

    @staticmethod
    def _refund_result(answer: Mapping[str, Any]) -> RefundResult:
        try:
            amount = _object(answer, "amount")
            return RefundResult(
                out_refund_no=_text(answer, "out_refund_no"),
                refund_id=_text(answer, "refund_id"),
                out_trade_no=_text(answer, "out_trade_no"),
                status=_text(answer, "status"),
                amount_refund=_int(amount, "refund"),
                amount_total=_int(amount, "total"),
                success_time=_text(answer, "success_time", optional=True) or None,
            )
        except _Shape as exc:
            raise ProviderUnavailable(f"WeChat Pay answered a malformed refund: {exc}") from None

    # -- HTTP

    def _authorization(self, method: str, path_qs: str, body: bytes) -> str:
        timestamp, nonce = str(int(self._clock())), _nonce()
        message = f"{method}\n{path_qs}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"
        signature = _sign(self.config.merchant_key, message)
        return (
            f'{AUTH_SCHEMA} mchid="{self.config.mchid}",nonce_str="{nonce}",'
            f'signature="{signature}",timestamp="{timestamp}",'
            f'serial_no="{self.config.merchant_serial}"'
        )

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def _call(
        self, method: str, path_qs: str, payload: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            return await self.breaker.call(lambda: self._send(method, path_qs, payload))
        except BreakerOpen as exc:
            raise ProviderUnavailable("WeChat Pay breaker is open") from exc

    async def _send(
        self, method: str, path_qs: str, payload: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        body = (
            b""
            if payload is None
            else json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        )
        headers = {
            "Authorization": self._authorization(method, path_qs, body),
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        if payload is not None:
            headers["Content-Type"] = "application/json"
        # encoded=True: the path and query go out exactly as they were signed
        url = URL(self.config.base_url + path_qs, encoded=True)
        where = f"WeChat Pay {method} {path_qs.split('?')[0]}"
        try:
            async with self._http().request(
                method, url, data=body or None, headers=headers, timeout=self._timeout
            ) as response:
                status, raw = response.status, await response.read()
                answer_headers = {k: v for k, v in response.headers.items()}
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ProviderUnavailable(f"{where}: {exc!r}") from exc
        if status >= 500 or status == 429:
            raise ProviderUnavailable(f"{where} answered {status} {_code(raw)}")
        try:
            self.verifier.verify(answer_headers, raw)
        except BadCallback as exc:
            # an answer we cannot attribute to WeChat Pay tells us nothing
            raise ProviderUnavailable(f"{where}: answer not verified ({exc.message})") from None
        if status >= 400:
            code, message = _code(raw), _message(raw)
            log.info("%s refused: %s %s %s", where, status, code, message)
            raise ProviderRefused(status, code, message)
        if not raw:
            return {}
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeError):
            raise ProviderUnavailable(f"{where} answered {status} without JSON") from None
        if not isinstance(answer, dict):
            raise ProviderUnavailable(f"{where} answered {status} with a non-object")
        return answer


def _error(raw: bytes) -> Mapping[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeError):
        return {}
    return document if isinstance(document, dict) else {}


def _code(raw: bytes) -> str:
    code = _error(raw).get("code")
    return code if isinstance(code, str) else "UNKNOWN"


def _message(raw: bytes) -> str:
    message = _error(raw).get("message")
    return message[:200] if isinstance(message, str) else ""
