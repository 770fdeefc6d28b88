"""What seckill keeps in Redis about payments placed with a provider: prepays, refunds, doubts.

Everything lives under the order's activity hash tag, beside the order it is about:

- ``prepays``: the payment order placed for a reserved order (stored once, record_prepay.lua);
  while it is there the sweeper lets the provider settle the order before releasing it.
- ``refunds`` + ``refunds:due``: one refund record per order whose payment came back
  refund_required (created by confirm_payment.lua), moved on by refund_update.lua, which also
  tells the order writer, so the store holds every refund's state.
- ``sk:payments:suspicious``: notices that verified but must not be believed as payments (not
  our merchant, a wrong amount, an unknown order): kept 30 days for a person (trimmed by
  MINID, never by count).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from seckill import keys
from seckill.connections import Client
from seckill.errors import RedisUnavailable
from seckill.scripts import CONNECTION_ERRORS, Scripts

# kept by age, never by count: a flood of bad notices cannot push out the one a person needs
SUSPICIOUS_KEPT_MS = 30 * 86_400_000
# a refund number's order id is kept as long as a provider may still send notices about it
REFUND_NUMBER_TTL_S = 400 * 86_400


@dataclasses.dataclass(frozen=True, slots=True)
class PrepayRecord:
    """A payment order placed with the provider for one of our orders."""

    order_id: str
    prepay_id: str
    out_trade_no: str
    amount_cents: int
    openid: str
    at_ms: int

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(
            {
                "prepay_id": self.prepay_id,
                "out_trade_no": self.out_trade_no,
                "amount_cents": self.amount_cents,
                "openid": self.openid,
                "at": self.at_ms,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, order_id: str, raw: bytes | str) -> PrepayRecord:
        """The record stored for ``order_id``."""
        data = json.loads(raw)
        return cls(
            order_id=order_id,
            prepay_id=str(data["prepay_id"]),
            out_trade_no=str(data["out_trade_no"]),
            amount_cents=int(data["amount_cents"]),
            openid=str(data.get("openid", "")),
            at_ms=int(data.get("at", 0)),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PrepayAnswer:
    """What record_prepay.lua said: exists / stored / none, or not_found / not_payable."""

    outcome: str
    record: PrepayRecord | None = None


# pending: to be asked for; processing: asked, the provider is working on it; refunded: done;
# attention: the provider will not finish it alone (a person looks, `seckill refunds retry`)
REFUND_STATES = ("pending", "processing", "refunded", "attention")


@dataclasses.dataclass(frozen=True, slots=True)
class RefundRecord:
    """One refund_required payment on its way back to the payer."""

    order_id: str
    provider: str
    transaction_id: str
    amount_cents: int
    status: str
    attempts: int
    out_refund_no: str
    refund_id: str
    reason: str
    created_at_ms: int
    updated_at_ms: int
    version: int

    @property
    def activity_id(self) -> str:
        """The activity the order belongs to."""
        return keys.activity_of_order(self.order_id) or ""

    def to_json(self) -> str:
        """The stored form (the field names confirm_payment.lua writes)."""
        return json.dumps(
            {
                "order_id": self.order_id,
                "provider": self.provider,
                "transaction_id": self.transaction_id,
                "amount_cents": self.amount_cents,
                "status": self.status,
                "attempts": self.attempts,
                "out_refund_no": self.out_refund_no,
                "refund_id": self.refund_id,
                "reason": self.reason,
                "created_at": self.created_at_ms,
                "updated_at": self.updated_at_ms,
                "version": self.version,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> RefundRecord:
        """From the stored JSON's (or a stream entry's) fields."""
        return cls(
            order_id=str(data["order_id"]),
            provider=str(data.get("provider", "")),
            transaction_id=str(data.get("transaction_id", "")),
            amount_cents=int(data["amount_cents"]),
            status=str(data["status"]),
            attempts=int(data.get("attempts", 0)),
            out_refund_no=str(data.get("out_refund_no", "")),
            refund_id=str(data.get("refund_id", "")),
            reason=str(data.get("reason", "")),
            created_at_ms=int(data.get("created_at", 0)),
            updated_at_ms=int(data.get("updated_at", 0)),
            version=int(data.get("version", 0)),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> RefundRecord:
        """From the stored JSON."""
        data: dict[str, Any] = json.loads(raw)
        return cls.from_mapping(data)

    def moved(self, **changes: Any) -> RefundRecord:
        """The next version of the record."""
        return dataclasses.replace(
            self, **changes, version=self.version + 1, updated_at_ms=int(time.time() * 1000)
        )

    def public(self) -> dict[str, Any]:
        """The refund as the admin API and `seckill refunds list` show it."""
        return {
            "order_id": self.order_id,
            "activity_id": self.activity_id,
            "provider": self.provider,
            "transaction_id": self.transaction_id,
            "amount_cents": self.amount_cents,
            "status": self.status,
            "attempts": self.attempts,
            "out_refund_no": self.out_refund_no,
            "refund_id": self.refund_id,
            "reason": self.reason,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Ledger:
    """Prepays, refunds and suspicious notices in Redis; Redis faults become RedisUnavailable."""

    def __init__(self, client: Client, scripts: Scripts) -> None:
        self._client = client
        self._scripts = scripts

    # -- prepays

    async def prepay(
        self, order_id: str, user_id: str, record: PrepayRecord | None = None
    ) -> PrepayAnswer:
        """Look up (record None) or store once the prepay of a reserved order of the user."""
        space = keys.space_of_order(order_id)
        if space is None:
            return PrepayAnswer("not_found")
        reply = await self._scripts.record_prepay(
            self._client,
            keys.prepay_keys(space),
            [order_id, user_id, record.to_json() if record is not None else ""],
        )
        outcome = _text(reply[0])
        stored = PrepayRecord.from_json(order_id, reply[1]) if len(reply) > 1 else None
        return PrepayAnswer(outcome, stored)

    async def prepays_of(self, activity_id: str, order_ids: list[str]) -> set[str]:
        """Those of ``order_ids`` that have a prepay."""
        if not order_ids:
            return set()
        try:
            values: Any = await self._client.hmget(keys.prepays(activity_id), order_ids)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return {order_id for order_id, v in zip(order_ids, values, strict=True) if v is not None}

    async def scan_prepays(
        self, activity_id: str, cursor: int, count: int
    ) -> tuple[int, list[PrepayRecord]]:
        """One HSCAN page of the activity's prepays: (next cursor, records)."""
        try:
            reply: Any = await self._client.hscan(keys.prepays(activity_id), cursor, count=count)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        following, page = reply
        return int(following), [PrepayRecord.from_json(_text(k), v) for k, v in page.items()]

    async def forget_prepay(self, order_id: str) -> None:
        """Drop a prepay whose provider order is settled (paid and confirmed, or closed)."""
        space = keys.space_of_order(order_id)
        if space is None:
            return
        try:
            await self._client.hdel(keys.prepays(space), order_id)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    # -- refunds

    async def refund(self, order_id: str) -> RefundRecord | None:
        """The refund record of an order, or None."""
        space = keys.space_of_order(order_id)
        if space is None:
            return None
        try:
            raw: Any = await self._client.hget(keys.refunds(space), order_id)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return RefundRecord.from_json(raw) if raw is not None else None

    async def refunds(self, activity_id: str) -> list[RefundRecord]:
        """Every refund record of the activity, oldest first (refunds are few: late payments)."""
        try:
            values: Any = await self._client.hvals(keys.refunds(activity_id))
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        records = [RefundRecord.from_json(v) for v in values]
        return sorted(records, key=lambda r: (r.created_at_ms, r.order_id))

    async def refunds_due(self, activity_id: str, now_ms: int, limit: int) -> list[str]:
        """Order ids whose refund should be tried now."""
        try:
            members: Any = await self._client.zrangebyscore(
                keys.refunds_due(activity_id), "-inf", now_ms, start=0, num=limit
            )
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return [_text(m) for m in members]

    async def move_refund(self, before: RefundRecord, after: RefundRecord, next_at_ms: int) -> bool:
        """Replace ``before`` by ``after`` (next try at ``next_at_ms``, -1: none); False if
        someone moved it first."""
        reply = await self._scripts.refund_update(
            self._client,
            keys.refund_keys(keys.space_of_order(before.order_id) or ""),
            [before.order_id, before.version, after.to_json(), next_at_ms],
        )
        return _text(reply[0]) == "ok"

    async def remember_refund_number(self, out_refund_no: str, order_id: str) -> None:
        """Refund notices name only the refund number: keep which order it stands for."""
        try:
            await self._client.set(
                keys.refund_number(out_refund_no), order_id, ex=REFUND_NUMBER_TTL_S
            )
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    async def order_of_refund_number(self, out_refund_no: str) -> str | None:
        """The order a refund number stands for, or None."""
        try:
            raw: Any = await self._client.get(keys.refund_number(out_refund_no))
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return _text(raw) if raw is not None else None

    # -- doubts

    async def suspicious(self, reason: str, **fields: str | int | None) -> None:
        """Keep a notice or answer that verified but must not be believed, for a person."""
        now_ms = int(time.time() * 1000)
        entry = {"reason": reason, "at_ms": str(now_ms)}
        entry.update({k: str(v) for k, v in fields.items() if v is not None})
        try:
            await self._client.xadd(
                keys.SUSPICIOUS_PAYMENTS,
                entry,  # type: ignore[arg-type]
                minid=str(now_ms - SUSPICIOUS_KEPT_MS),
                approximate=True,
            )
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    async def suspicious_entries(self, limit: int) -> list[dict[str, str]]:
        """The newest suspicious entries, newest first."""
        try:
            page: Any = await self._client.xrevrange(keys.SUSPICIOUS_PAYMENTS, count=limit)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return [
            {"id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
            for entry_id, fields in page
        ]
