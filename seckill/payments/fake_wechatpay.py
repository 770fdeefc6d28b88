"""A faithful local WeChat Pay v3: the endpoints seckill uses, signed and encrypted as WeChat does.

For the test suite and ``seckill up --fake-wechatpay`` on one machine. It verifies the
merchant's request signatures with the merchant's public key, signs every answer and every
notification with its own RSA key (so the client's verification is exercised, not skipped),
encrypts notification resources with the APIv3 key, keeps orders (one prepay per
out_trade_no), refuses payment after ``time_expire`` or after a close, and retries
notifications on WeChat's schedule until answered 200/204.

It is written apart from ``wechatpay.py`` on purpose (no shared signing helpers): a mistake
in the client's reading of the protocol then shows up as a refusal here, not as two copies of
the same mistake agreeing with each other.

Faults a test (or a rehearsal) can ask for: drop, delay, duplicate or hold-and-reorder
notifications; fail the next N calls of an operation (e.g. refunds) with 5xx; stall answers;
settle refunds as ABNORMAL.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

# WeChat Pay's notification retry schedule, in seconds after the previous attempt (about 24 h)
RETRY_SCHEDULE_S = (15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800,
                    21600, 21600)  # fmt: skip

_CHINA = timezone(timedelta(hours=8))
_OUT_TRADE_NO = re.compile(r"[A-Za-z0-9_*-]{6,32}")
_OUT_REFUND_NO = re.compile(r"[A-Za-z0-9_|*@-]{1,64}")
_AUTH = re.compile(r'([a-z_]+)="([^"]*)"')
OPERATIONS = ("prepay", "query", "close", "refund", "query_refund")


def _china_time(at: float) -> str:
    return datetime.fromtimestamp(int(at), tz=_CHINA).isoformat()


class FakeRefusal(Exception):
    """A WeChat-style refusal: HTTP status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclasses.dataclass
class FakeOrder:
    """A JSAPI payment order as the fake keeps it."""

    out_trade_no: str
    request: dict[str, Any]  # the prepay body, to tell a repeat from a conflicting reuse
    prepay_id: str
    expires_at: float  # epoch seconds
    created_at: float = 0.0
    state: str = "NOTPAY"  # NOTPAY, SUCCESS, REFUND, CLOSED
    transaction_id: str = ""
    success_time: str = ""
    refunded: int = 0

    @property
    def total(self) -> int:
        """The amount in fen."""
        return int(self.request["amount"]["total"])

    @property
    def openid(self) -> str:
        """The payer the order is bound to."""
        return str(self.request["payer"]["openid"])

    def document(self) -> dict[str, Any]:
        """The order as the query endpoint answers it."""
        doc: dict[str, Any] = {
            "appid": self.request["appid"],
            "mchid": self.request["mchid"],
            "out_trade_no": self.out_trade_no,
            "trade_type": "JSAPI",
            "trade_state": self.state,
            "trade_state_desc": {
                "NOTPAY": "订单未支付",
                "SUCCESS": "支付成功",
                "REFUND": "转入退款",
                "CLOSED": "已关闭",
            }[self.state],
            "amount": {"total": self.total, "currency": "CNY"},
        }
        if self.state in ("SUCCESS", "REFUND"):
            doc.update(
                transaction_id=self.transaction_id,
                bank_type="OTHERS",
                attach=self.request.get("attach", ""),
                success_time=self.success_time,
                payer={"openid": self.openid},
            )
            doc["amount"].update(payer_total=self.total, payer_currency="CNY")
        return doc


@dataclasses.dataclass
class FakeRefund:
    """A refund as the fake keeps it."""

    out_refund_no: str
    refund_id: str
    order: FakeOrder
    amount_refund: int
    notify_url: str
    create_time: str
    status: str = "PROCESSING"  # then SUCCESS or ABNORMAL
    success_time: str = ""

    def document(self) -> dict[str, Any]:
        """The refund as the refund endpoints answer it."""
        doc: dict[str, Any] = {
            "refund_id": self.refund_id,
            "out_refund_no": self.out_refund_no,
            "transaction_id": self.order.transaction_id,
            "out_trade_no": self.order.out_trade_no,
            "channel": "ORIGINAL",
            "user_received_account": "支付用户零钱",
            "create_time": self.create_time,
            "status": self.status,
            "funds_account": "AVAILABLE",
            "amount": {
                "total": self.order.total,
                "refund": self.amount_refund,
                "payer_total": self.order.total,
                "payer_refund": self.amount_refund,
                "settlement_refund": self.amount_refund,
                "settlement_total": self.order.total,
                "discount_refund": 0,
                "currency": "CNY",
            },
        }
        if self.success_time:
            doc["success_time"] = self.success_time
        return doc


@dataclasses.dataclass
class Notification:
    """One notification (its id is the same on every retry and every duplicate)."""

    notice_id: str
    event_type: str
    url: str
    body: bytes


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One attempt to deliver a notification, and the merchant's answer (None: no answer)."""

    notice_id: str
    event_type: str
    attempt: int
    status: int | None


@dataclasses.dataclass
class CallbackFaults:
    """What to do to the next notifications."""

    drop: int = 0  # the next N notifications are lost: never sent, never retried
    delay_s: float = 0.0  # wait before the first attempt
    duplicate: bool = False  # deliver each notification twice, concurrently
    hold: bool = False  # keep them until release_held() (which can reorder them)


class FakeWechatPay:
    """The local WeChat Pay's state and its aiohttp app (``app``)."""

    def __init__(
        self,
        *,
        mchid: str,
        appid: str,
        apiv3_key: bytes,
        merchant_public_keys: Mapping[str, rsa.RSAPublicKey],
        platform_keys: Mapping[str, rsa.RSAPrivateKey],
        signing_serial: str | None = None,
        retry_scale: float = 1.0,
        tolerance_s: int = 300,
        callback_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(apiv3_key) != 32:
            raise ValueError("the APIv3 key is 32 bytes")
        self.mchid, self.appid, self.apiv3_key = mchid, appid, apiv3_key
        self.merchant_public_keys = dict(merchant_public_keys)
        self.platform_keys = dict(platform_keys)
        self.signing_serial = signing_serial or next(iter(self.platform_keys))
        self.retry_scale = retry_scale
        self.tolerance_s = tolerance_s
        self.callback_timeout_s = callback_timeout_s
        self.clock = clock
        self.orders: dict[str, FakeOrder] = {}
        self.refunds: dict[str, FakeRefund] = {}
        self.notifications: list[Notification] = []
        self.deliveries: list[Delivery] = []
        self.dropped: list[Notification] = []
        self.held: list[Notification] = []
        self.faults = CallbackFaults()
        self.failures: dict[str, tuple[int, int, str]] = {}  # operation -> (n, status, code)
        self.calls: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
        self.stall_s = 0.0
        self.refund_outcome = "SUCCESS"  # or ABNORMAL: the money could not reach the payer
        self.refund_settle_s = 0.0
        # older WeChat Pay documents forbid closing an order in its first 5 minutes; 0: allowed
        self.close_min_age_s = 0.0
        self._prepay_index: dict[str, str] = {}  # prepay_id -> out_trade_no
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.app = web.Application(middlewares=[self._v3_middleware])
        self.app.add_routes(
            [
                web.post("/v3/pay/transactions/jsapi", self._prepay),
                web.get("/v3/pay/transactions/out-trade-no/{no}", self._query),
                web.post("/v3/pay/transactions/out-trade-no/{no}/close", self._close),
                web.post("/v3/refund/domestic/refunds", self._refund),
                web.get("/v3/refund/domestic/refunds/{no}", self._query_refund),
                web.post("/fake/pay/{no}", self._fake_pay),
                web.post("/fake/request-payment", self._fake_pay),
            ]
        )
        self.app.on_cleanup.append(self._on_cleanup)

    # -- what a test does

    def fail_next(
        self, operation: str, times: int, *, status: int = 500, code: str = "SYSTEM_ERROR"
    ) -> None:
        """Answer the next ``times`` calls of ``operation`` with ``status`` and ``code``."""
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}")
        self.failures[operation] = (times, status, code)

    def pay(self, out_trade_no: str, *, at: float | None = None, openid: str | None = None) -> str:
        """The payer pays (as wx.requestPayment would); the transaction id, or FakeRefusal."""
        order = self.orders.get(out_trade_no)
        if order is None:
            raise FakeRefusal(404, "ORDER_NOT_EXIST", "订单不存在")
        if order.state == "CLOSED":
            raise FakeRefusal(400, "ORDER_CLOSED", "订单已关闭")
        if order.state in ("SUCCESS", "REFUND"):
            raise FakeRefusal(403, "ORDERPAID", "订单已支付")
        moment = self.clock() if at is None else at
        if moment > order.expires_at:
            raise FakeRefusal(400, "ORDER_EXPIRED", "订单已过期 (time_expire)")
        if openid is not None and openid != order.openid:
            raise FakeRefusal(403, "OPENID_MISMATCH", "支付用户与下单用户不一致")
        order.state = "SUCCESS"
        order.transaction_id = "4200" + "".join(secrets.choice("0123456789") for _ in range(24))
        order.success_time = _china_time(moment)
        self._notify(
            str(order.request["notify_url"]),
            "TRANSACTION.SUCCESS",
            "支付成功",
            "transaction",
            order.document(),
        )
        return order.transaction_id

    def release_held(self, *, reverse: bool = True) -> None:
        """Send the held notifications, the newest first unless ``reverse`` is False."""
        held, self.held = self.held, []
        if reverse:
            held.reverse()
        self._spawn(self._deliver_in_order(held))

    def delivered(self, event_type: str | None = None) -> list[Delivery]:
        """Deliveries the merchant answered 200/204."""
        return [
            d
            for d in self.deliveries
            if d.status in (200, 204) and (event_type is None or d.event_type == event_type)
        ]

    async def aclose(self) -> None:
        """Stop retrying notifications and close the outbound session."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.aclose()

    # -- the v3 API

    @web.middleware
    async def _v3_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith("/v3/"):
            return await handler(request)
        body = await request.read()
        try:
            self._check_merchant_signature(request, body)
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            response = await handler(request)
        except FakeRefusal as refusal:
            return self._answer(refusal.status, {"code": refusal.code, "message": refusal.message})
        return response

    def _check_merchant_signature(self, request: web.Request, body: bytes) -> None:
        schema, _, rest = request.headers.get("Authorization", "").partition(" ")
        if schema != "WECHATPAY2-SHA256-RSA2048":
            raise FakeRefusal(401, "SIGN_ERROR", "Authorization 头缺失或认证类型错误")
        fields = dict(_AUTH.findall(rest))
        missing = {"mchid", "nonce_str", "signature", "timestamp", "serial_no"} - set(fields)
        if missing:
            raise FakeRefusal(401, "SIGN_ERROR", f"Authorization 缺少 {sorted(missing)[0]}")
        if fields["mchid"] != self.mchid:
            raise FakeRefusal(401, "SIGN_ERROR", "mchid 与商户号不符")
        key = self.merchant_public_keys.get(fields["serial_no"])
        if key is None:
            raise FakeRefusal(401, "SIGN_ERROR", "商户证书序列号有误")
        if not fields["timestamp"].isascii() or not fields["timestamp"].isdigit():
            raise FakeRefusal(401, "SIGN_ERROR", "timestamp 格式错误")
        if abs(self.clock() - int(fields["timestamp"])) > self.tolerance_s:
            raise FakeRefusal(401, "SIGN_ERROR", "请求时间已过期")
        # WeChat signs the URL as sent: the raw path and query, not a re-encoded one
        message = (
            f"{request.method}\n{request.raw_path}\n{fields['timestamp']}\n"
            f"{fields['nonce_str']}\n".encode()
            + body
            + b"\n"
        )
        try:
            signature = base64.b64decode(fields["signature"], validate=True)
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, binascii.Error, ValueError):
            raise FakeRefusal(401, "SIGN_ERROR", "签名错误") from None

    def _signed_headers(self, body: bytes) -> dict[str, str]:
        timestamp, nonce = str(int(self.clock())), secrets.token_hex(16)
        message = f"{timestamp}\n{nonce}\n".encode() + body + b"\n"
        key = self.platform_keys[self.signing_serial]
        signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return {
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Signature": base64.b64encode(signature).decode(),
            "Wechatpay-Serial": self.signing_serial,
            "Request-ID": str(uuid.uuid4()),
        }

    def _answer(self, status: int, document: Mapping[str, Any] | None) -> web.Response:
        body = b"" if document is None else json.dumps(document, ensure_ascii=False).encode()
        headers = self._signed_headers(body)
        if document is not None:
            headers["Content-Type"] = "application/json; charset=utf-8"
        return web.Response(status=status, body=body, headers=headers)

    def _count(self, operation: str) -> None:
        self.calls[operation] += 1
        times, status, code = self.failures.get(operation, (0, 0, ""))
        if times > 0:
            self.failures[operation] = (times - 1, status, code)
            raise FakeRefusal(status, code, "系统错误 (injected)")

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            document = json.loads(await request.read())
        except (ValueError, UnicodeError):
            raise FakeRefusal(400, "PARAM_ERROR", "body is not JSON") from None
        if not isinstance(document, dict):
            raise FakeRefusal(400, "PARAM_ERROR", "body must be an object")
        return document

    async def _prepay(self, request: web.Request) -> web.Response:
        self._count("prepay")
        doc = await self._json(request)
        for name in ("appid", "mchid", "description", "out_trade_no", "notify_url"):
            if not isinstance(doc.get(name), str) or not doc[name]:
                raise FakeRefusal(400, "PARAM_ERROR", f"缺少参数 {name}")
        if doc["appid"] != self.appid or doc["mchid"] != self.mchid:
            raise FakeRefusal(400, "APPID_MCHID_NOT_MATCH", "appid和mch_id不匹配")
        if not _OUT_TRADE_NO.fullmatch(doc["out_trade_no"]):
            raise FakeRefusal(400, "PARAM_ERROR", "out_trade_no 格式错误")
        if len(doc["description"]) > 127 or len(str(doc.get("attach", ""))) > 128:
            raise FakeRefusal(400, "PARAM_ERROR", "description 或 attach 过长")
        amount, payer = doc.get("amount"), doc.get("payer")
        total = amount.get("total") if isinstance(amount, dict) else None
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise FakeRefusal(400, "PARAM_ERROR", "amount.total 必须为正整数")
        if isinstance(amount, dict) and amount.get("currency", "CNY") != "CNY":
            raise FakeRefusal(400, "PARAM_ERROR", "amount.currency 仅支持 CNY")
        if not isinstance(payer, dict) or not isinstance(payer.get("openid"), str):
            raise FakeRefusal(400, "PARAM_ERROR", "缺少参数 payer.openid")
        expires_at = self.clock() + 7200.0  # WeChat's default validity without time_expire
        if "time_expire" in doc:
            try:
                moment = datetime.fromisoformat(str(doc["time_expire"]))
            except ValueError:
                raise FakeRefusal(400, "PARAM_ERROR", "time_expire 格式错误") from None
            if moment.tzinfo is None:
                raise FakeRefusal(400, "PARAM_ERROR", "time_expire 缺少时区")
            expires_at = moment.timestamp()
        existing = self.orders.get(doc["out_trade_no"])
        if existing is not None:
            if existing.state == "CLOSED":
                raise FakeRefusal(400, "ORDER_CLOSED", "订单已关闭")
            if existing.state in ("SUCCESS", "REFUND"):
                raise FakeRefusal(403, "ORDERPAID", "订单已支付")
            if existing.request != doc:
                raise FakeRefusal(400, "OUT_TRADE_NO_USED", "商户订单号重复")
            return self._answer(200, {"prepay_id": existing.prepay_id})
        if expires_at <= self.clock():
            raise FakeRefusal(400, "PARAM_ERROR", "time_expire 已过")
        prepay_id = "wx" + secrets.token_hex(17)
        self.orders[doc["out_trade_no"]] = FakeOrder(
            doc["out_trade_no"], doc, prepay_id, expires_at, created_at=self.clock()
        )
        self._prepay_index[prepay_id] = doc["out_trade_no"]
        return self._answer(200, {"prepay_id": prepay_id})

    def _order(self, request: web.Request) -> FakeOrder:
        order = self.orders.get(request.match_info["no"])
        if order is None:
            raise FakeRefusal(404, "ORDER_NOT_EXIST", "订单不存在")
        return order

    async def _query(self, request: web.Request) -> web.Response:
        self._count("query")
        if request.query.get("mchid") != self.mchid:
            raise FakeRefusal(400, "PARAM_ERROR", "mchid 缺失或有误")
        return self._answer(200, self._order(request).document())

    async def _close(self, request: web.Request) -> web.Response:
        self._count("close")
        if (await self._json(request)).get("mchid") != self.mchid:
            raise FakeRefusal(400, "PARAM_ERROR", "mchid 缺失或有误")
        order = self._order(request)
        if order.state in ("SUCCESS", "REFUND"):
            raise FakeRefusal(400, "ORDERPAID", "订单已支付")
        if order.state == "NOTPAY" and self.clock() - order.created_at < self.close_min_age_s:
            raise FakeRefusal(400, "INVALID_REQUEST", "订单生成后不能马上调用关单接口")
        order.state = "CLOSED"
        return self._answer(204, None)

    async def _refund(self, request: web.Request) -> web.Response:
        self._count("refund")
        doc = await self._json(request)
        out_refund_no, out_trade_no = doc.get("out_refund_no"), doc.get("out_trade_no")
        if not isinstance(out_refund_no, str) or not _OUT_REFUND_NO.fullmatch(out_refund_no):
            raise FakeRefusal(400, "PARAM_ERROR", "out_refund_no 格式错误")
        amount = doc.get("amount")
        if not isinstance(amount, dict) or amount.get("currency") != "CNY":
            raise FakeRefusal(400, "PARAM_ERROR", "amount 缺失或币种有误")
        refund, total = amount.get("refund"), amount.get("total")
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (refund, total)
        ):
            raise FakeRefusal(400, "PARAM_ERROR", "amount.refund/total 必须为正整数")
        assert isinstance(refund, int) and isinstance(total, int)
        existing = self.refunds.get(out_refund_no)
        if existing is not None:
            # the same out_refund_no again is the same refund, never a second one
            if existing.order.out_trade_no != out_trade_no or existing.amount_refund != refund:
                raise FakeRefusal(400, "INVALID_REQUEST", "退款单号已用于其他退款")
            return self._answer(200, existing.document())
        order = self.orders.get(str(out_trade_no))
        if order is None:
            raise FakeRefusal(404, "RESOURCE_NOT_EXISTS", "订单不存在")
        if order.state not in ("SUCCESS", "REFUND"):
            raise FakeRefusal(400, "INVALID_REQUEST", "订单未支付")
        if total != order.total:
            raise FakeRefusal(400, "PARAM_ERROR", "订单金额与原订单不符")
        if refund > order.total - order.refunded:
            raise FakeRefusal(400, "INVALID_REQUEST", "申请退款金额超过订单可退金额")
        order.refunded += refund
        order.state = "REFUND"
        record = FakeRefund(
            out_refund_no=out_refund_no,
            refund_id="50" + "".join(secrets.choice("0123456789") for _ in range(27)),
            order=order,
            amount_refund=refund,
            notify_url=str(doc.get("notify_url") or ""),
            create_time=_china_time(self.clock()),
        )
        self.refunds[out_refund_no] = record
        self._spawn(self._settle(record))
        return self._answer(200, record.document())

    async def _query_refund(self, request: web.Request) -> web.Response:
        self._count("query_refund")
        record = self.refunds.get(request.match_info["no"])
        if record is None:
            raise FakeRefusal(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
        return self._answer(200, record.document())

    async def _settle(self, record: FakeRefund) -> None:
        await asyncio.sleep(self.refund_settle_s)
        record.status = self.refund_outcome
        if record.status == "SUCCESS":
            record.success_time = _china_time(self.clock())
        if record.notify_url:
            resource = {
                "mchid": self.mchid,
                "out_trade_no": record.order.out_trade_no,
                "transaction_id": record.order.transaction_id,
                "out_refund_no": record.out_refund_no,
                "refund_id": record.refund_id,
                "refund_status": record.status,
                "user_received_account": "支付用户零钱",
                "amount": {
                    "total": record.order.total,
                    "refund": record.amount_refund,
                    "payer_total": record.order.total,
                    "payer_refund": record.amount_refund,
                },
            }
            if record.success_time:
                resource["success_time"] = record.success_time
            summary = "退款成功" if record.status == "SUCCESS" else "退款异常"
            self._notify(record.notify_url, f"REFUND.{record.status}", summary, "refund", resource)

    # -- the mini program's side

    async def _fake_pay(self, request: web.Request) -> web.Response:
        """What wx.requestPayment does: check paySign with the merchant key, then pay.

        ``/fake/request-payment`` takes exactly the parameters the gateway gave the mini
        program (the order is found by its prepay id); ``/fake/pay/{out_trade_no}`` names it.
        """
        try:
            doc = json.loads(await request.read())
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            if "no" in request.match_info:
                order = self.orders.get(request.match_info["no"])
            else:
                order = self._by_prepay_id(str(doc.get("package", "")))
            if order is None:
                raise FakeRefusal(404, "ORDER_NOT_EXIST", "订单不存在")
            fields = [str(doc[name]) for name in ("appId", "timeStamp", "nonceStr", "package")]
            if fields[0] != self.appid or fields[3] != f"prepay_id={order.prepay_id}":
                raise FakeRefusal(400, "PARAM_ERROR", "appId 或 package 与订单不符")
            if doc.get("signType") != "RSA":
                raise FakeRefusal(400, "PARAM_ERROR", "signType 必须为 RSA")
            message = "".join(f"{field}\n" for field in fields).encode()
            signature = base64.b64decode(str(doc["paySign"]), validate=True)
            if not any(
                _verifies(key, signature, message) for key in self.merchant_public_keys.values()
            ):
                raise FakeRefusal(401, "SIGN_ERROR", "paySign 签名错误")
            openid = doc.get("openid")
            transaction_id = self.pay(order.out_trade_no, openid=openid if openid else None)
        except FakeRefusal as refusal:
            return web.json_response(
                {"code": refusal.code, "message": refusal.message}, status=refusal.status
            )
        except (ValueError, KeyError, UnicodeError, binascii.Error) as exc:
            return web.json_response({"code": "PARAM_ERROR", "message": str(exc)}, status=400)
        return web.json_response({"trade_state": "SUCCESS", "transaction_id": transaction_id})

    def _by_prepay_id(self, package: str) -> FakeOrder | None:
        out_trade_no = self._prepay_index.get(package.removeprefix("prepay_id="))
        return None if out_trade_no is None else self.orders.get(out_trade_no)

    # -- notifications

    def _notify(
        self,
        url: str,
        event_type: str,
        summary: str,
        original_type: str,
        resource: Mapping[str, Any],
    ) -> None:
        nonce = secrets.token_urlsafe(9)[:12]
        ciphertext = AESGCM(self.apiv3_key).encrypt(
            nonce.encode(),
            json.dumps(resource, ensure_ascii=False).encode(),
            original_type.encode(),
        )
        document = {
            "id": str(uuid.uuid4()),
            "create_time": _china_time(self.clock()),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": summary,
            "resource": {
                "original_type": original_type,
                "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": base64.b64encode(ciphertext).decode(),
                "associated_data": original_type,
                "nonce": nonce,
            },
        }
        notification = Notification(
            str(document["id"]), event_type, url, json.dumps(document, ensure_ascii=False).encode()
        )
        self.notifications.append(notification)
        faults = self.faults
        if faults.drop > 0:
            faults.drop -= 1
            self.dropped.append(notification)
            return
        if faults.hold:
            self.held.append(notification)
            return
        for _ in range(2 if faults.duplicate else 1):
            self._spawn(self._deliver(notification, faults.delay_s))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_in_order(self, notifications: list[Notification]) -> None:
        for notification in notifications:
            if not await self._attempt(notification, 1):
                self._spawn(self._deliver(notification, 0.0, first=2))

    async def _deliver(self, notification: Notification, delay_s: float, first: int = 1) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        waits = (0.0, *RETRY_SCHEDULE_S)
        for attempt in range(first, len(waits) + 1):
            if attempt > 1:
                await asyncio.sleep(waits[attempt - 1] * self.retry_scale)
            if await self._attempt(notification, attempt):
                return
        log.warning("notification %s not acknowledged; given up", notification.notice_id)

    async def _attempt(self, notification: Notification, attempt: int) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        # signed afresh on every attempt: the merchant refuses stale timestamps
        headers = self._signed_headers(notification.body)
        headers["Content-Type"] = "application/json"
        status: int | None
        try:
            async with self._session.post(
                notification.url,
                data=notification.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.callback_timeout_s),
            ) as response:
                await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.debug("notification %s attempt %d: %r", notification.notice_id, attempt, exc)
            status = None
        self.deliveries.append(
            Delivery(notification.notice_id, notification.event_type, attempt, status)
        )
        return status in (200, 204)


def _verifies(key: rsa.RSAPublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


class FakeWechatPayServer:
    """Runs a FakeWechatPay on a loopback port (0: a free one)."""

    def __init__(self, fake: FakeWechatPay, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fake, self.host, self.port = fake, host, port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The base URL to configure the client with."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        """Listen; the base URL."""
        self._runner = web.AppRunner(self.fake.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.url

    async def stop(self) -> None:
        """Stop listening and retrying notifications."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# --- one machine: `seckill up --fake-wechatpay` and `python -m seckill.payments.fake_wechatpay`

DEV_MCHID = "1900000001"
DEV_APPID = "wx0000000000000001"
DEV_MERCHANT_SERIAL = "DEV0000000000000000000000000000000000001"
DEV_PLATFORM_SERIAL = "PUB_KEY_ID_0000DEV00000000000000000000001"


@dataclasses.dataclass
class DevelopmentSetup:
    """A local WeChat Pay and the merchant side that matches it, with keys made at run time."""

    fake: FakeWechatPay
    merchant_key: rsa.RSAPrivateKey

    def environment(self, directory: Path, base_url: str, notify_url: str) -> dict[str, str]:
        """Write the merchant's key files under ``directory``; the SECKILL_WECHATPAY_* to use."""
        directory.mkdir(parents=True, exist_ok=True)
        merchant_file = directory / "wechatpay_merchant_key.pem"
        public_file = directory / "wechatpay_public_key.pem"
        apiv3_file = directory / "wechatpay_apiv3_key"
        _write_secret(
            merchant_file,
            self.merchant_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_secret(apiv3_file, self.fake.apiv3_key)
        platform_public = self.fake.platform_keys[self.fake.signing_serial].public_key()
        public_file.write_bytes(
            platform_public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return {
            "SECKILL_WECHATPAY_MCHID": self.fake.mchid,
            "SECKILL_WECHATPAY_APPID": self.fake.appid,
            "SECKILL_WECHATPAY_MERCHANT_SERIAL": DEV_MERCHANT_SERIAL,
            "SECKILL_WECHATPAY_MERCHANT_KEY_FILE": str(merchant_file),
            "SECKILL_WECHATPAY_APIV3_KEY_FILE": str(apiv3_file),
            "SECKILL_WECHATPAY_PUBLIC_KEY_ID": self.fake.signing_serial,
            "SECKILL_WECHATPAY_PUBLIC_KEY_FILE": str(public_file),
            "SECKILL_WECHATPAY_NOTIFY_URL": notify_url,
            "SECKILL_WECHATPAY_BASE_URL": base_url,
        }


def _write_secret(path: Path, data: bytes) -> None:
    # created 0600 from the start: never readable by others, even for a moment
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def development_setup(*, retry_scale: float = 1.0) -> DevelopmentSetup:
    """A fake WeChat Pay with fresh keys and an APIv3 key, for one machine."""
    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    platform = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake = FakeWechatPay(
        mchid=DEV_MCHID,
        appid=DEV_APPID,
        apiv3_key=secrets.token_hex(16).encode(),
        merchant_public_keys={DEV_MERCHANT_SERIAL: merchant.public_key()},
        platform_keys={DEV_PLATFORM_SERIAL: platform},
        retry_scale=retry_scale,
    )
    return DevelopmentSetup(fake, merchant)


async def _serve(args: argparse.Namespace) -> None:
    setup = development_setup(retry_scale=args.retry_scale)
    server = FakeWechatPayServer(setup.fake, args.host, args.port)
    base_url = await server.start()
    environment = setup.environment(Path(args.dir), base_url, args.notify_url)
    env_file = Path(args.dir) / "wechatpay.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in environment.items()))
    log.warning("local WeChat Pay on %s; merchant settings in %s", base_url, env_file)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    """Run a local WeChat Pay until interrupted, writing the merchant's settings to --dir."""
    parser = argparse.ArgumentParser(prog="python -m seckill.payments.fake_wechatpay")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", default="var/wechatpay", help="where the key files go")
    parser.add_argument(
        "--notify-url", default="http://127.0.0.1:8080/api/v1/payments/wechat/notify"
    )
    parser.add_argument("--retry-scale", type=float, default=1.0, help="compress retry waits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
