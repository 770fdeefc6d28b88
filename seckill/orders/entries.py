"""Stream entries as the writer sees them: what they say, and how a batch of them is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from seckill.orders.record import OrderRecord
from seckill.orders.store import Batch, PaymentEvent, RefundEvent, Transition

Item = OrderRecord | Transition | PaymentEvent | RefundEvent


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: where it lives and its raw fields (None when it was deleted)."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes] | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.stream, self.entry_id)


class PoisonEntry(ValueError):
    """An entry that cannot be decoded: no store will ever take it, so it is dead-lettered."""


def text(value: Any) -> str:
    """A Redis reply value (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def activity_of(stream: str) -> str:
    """The activity id of a stream key (``sk:{a:<id>}:...``)."""
    return stream.split("{a:", 1)[1].split("}", 1)[0]


def is_orders(stream: str) -> bool:
    """True for an orders stream, False for a changes stream."""
    return stream.endswith(":stream")


def decode(stream: str, fields: dict[bytes, bytes] | None) -> Item:
    """One stream entry as a store operation; PoisonEntry when it makes no sense."""
    if fields is None:
        raise PoisonEntry("entry deleted from the stream while pending")
    try:
        if is_orders(stream):
            return OrderRecord.unpack(fields[b"o"])
        change: dict[str, Any] = msgpack.unpackb(fields[b"c"], raw=False)
        if change["kind"] == "transition":
            return Transition(
                order=OrderRecord.unpack(msgpack.packb(change["order"])),
                from_state=str(change["from"]),
                to_state=str(change["to"]),
                at_ms=int(change["at"]),
            )
        if change["kind"] == "payment":
            return PaymentEvent(
                event_id=str(change["event_id"]),
                order_id=str(change["order_id"]),
                amount_cents=int(change["amount_cents"]),
                result=str(change["result"]),
                at_ms=int(change["at"]),
            )
        if change["kind"] == "refund":
            order_id = str(change["order_id"])
            return RefundEvent(
                order_id=order_id,
                activity_id=order_id.rsplit(".", 1)[0],
                provider=str(change["provider"]),
                transaction_id=str(change["transaction_id"]),
                amount_cents=int(change["amount_cents"]),
                status=str(change["status"]),
                attempts=int(change["attempts"]),
                out_refund_no=str(change["out_refund_no"]),
                refund_id=str(change["refund_id"]),
                reason=str(change["reason"]),
                created_at_ms=int(change["created_at"]),
                updated_at_ms=int(change["updated_at"]),
                version=int(change["version"]),
            )
        raise PoisonEntry(f"unknown change kind {change['kind']!r}")
    except PoisonEntry:
        raise
    except Exception as exc:
        raise PoisonEntry(f"undecodable entry: {exc!r}") from exc


def batch_of(items: list[Item]) -> Batch:
    """The store batch of decoded entries (creations, transitions, payments)."""
    batch = Batch()
    for item in items:
        if isinstance(item, OrderRecord):
            batch.created.append(item)
        elif isinstance(item, Transition):
            batch.transitions.append(item)
        elif isinstance(item, RefundEvent):
            batch.refunds.append(item)
        else:
            batch.payments.append(item)
    return batch
