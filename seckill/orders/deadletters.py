"""Dead letters: stream entries parked for a person, per activity, and putting them back.

An entry moves here (one atomic Lua step: copy with its origin, reason and attempts, then XACK)
when no store will ever take it: it cannot be decoded, a healthy database refused it by itself
``max_deliveries`` times, or the store refused its state change (an illegal transition). A
person fixes the cause and replays it: the entry goes back to its origin stream as a new entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from seckill import keys, resources
from seckill.connections import Client
from seckill.orders.entries import PoisonEntry, activity_of, decode, text
from seckill.orders.record import OrderRecord
from seckill.orders.store import PaymentEvent, RefundEvent, Transition
from seckill.orders.streams import GROUP
from seckill.scripts import Script

log = logging.getLogger(__name__)

_META = (b"origin_stream", b"origin_id", b"reason", b"attempts", b"missing")


@dataclass(frozen=True, slots=True)
class DeadLetterScripts:
    """The Lua steps of dead letters and of the writers' group upkeep."""

    dead_letter: Script
    replay_dead_letter: Script
    forget_consumer: Script

    @classmethod
    def load(cls) -> DeadLetterScripts:
        directory = resources.lua_dir()
        return cls(
            **{
                name: Script.from_file(directory / f"{name}.lua")
                for name in cls.__dataclass_fields__
            }
        )


_scripts: DeadLetterScripts | None = None


def scripts() -> DeadLetterScripts:
    """The scripts, read from lua/ once per process."""
    global _scripts
    if _scripts is None:
        _scripts = DeadLetterScripts.load()
    return _scripts


async def move(
    client: Client, stream: str, entry_id: str, reason: str, attempts: int
) -> str | None:
    """Dead-letter one pending entry atomically; its dead letter id, or None if not pending."""
    dead = keys.dead_letters(activity_of(stream))
    reply: Any = await scripts().dead_letter(
        client, [stream, dead], [GROUP, entry_id, reason[:500], attempts]
    )
    if text(reply[0]) != "moved":
        return None
    return text(reply[1])


async def count(client: Client, activity_id: str) -> int:
    """How many dead letters the activity holds (XLEN: O(1))."""
    return int(await client.xlen(keys.dead_letters(activity_id)))


def _summary(stream: str, fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    """What the payload says, when it decodes: the order's identity and state, no more."""
    payload = {k: v for k, v in fields.items() if k not in _META}
    try:
        item = decode(stream, payload)
    except PoisonEntry:
        return None
    if isinstance(item, OrderRecord):
        return {"kind": "order", "order_id": item.order_id, "status": item.status}
    if isinstance(item, Transition):
        return {
            "kind": "transition",
            "order_id": item.order.order_id,
            "from": item.from_state,
            "to": item.to_state,
        }
    if isinstance(item, RefundEvent):
        return {
            "kind": "refund",
            "order_id": item.order_id,
            "status": item.status,
            "version": item.version,
        }
    assert isinstance(item, PaymentEvent)
    return {
        "kind": "payment",
        "order_id": item.order_id,
        "event_id": item.event_id,
        "result": item.result,
    }


def describe(dead_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One dead letter as JSON: id, origin, reason, attempts and a decoded summary (or None)."""
    origin = text(fields.get(b"origin_stream", b""))
    return {
        "id": dead_id,
        "origin_stream": origin,
        "origin_id": text(fields.get(b"origin_id", b"")),
        "reason": text(fields.get(b"reason", b"")),
        "attempts": int(text(fields.get(b"attempts", b"0")) or 0),
        "missing": fields.get(b"missing") == b"1",
        "summary": _summary(origin, fields) if origin else None,
    }


async def page(client: Client, activity_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """The oldest ``limit`` dead letters of the activity, described."""
    entries: Any = await client.xrange(keys.dead_letters(activity_id), count=limit)
    return [describe(text(dead_id), dict(fields)) for dead_id, fields in entries]


async def replay(client: Client, activity_id: str, batch: int = 100) -> tuple[int, list[str]]:
    """Move every dead letter back to its origin stream: (replayed, ids left with why)."""
    dead = keys.dead_letters(activity_id)
    allowed = {keys.stream(activity_id), keys.changes(activity_id)}
    replayed = 0
    refused: list[str] = []
    cursor = "-"
    while True:
        entries: Any = await client.xrange(dead, min=cursor, max="+", count=batch)
        if not entries:
            break
        for dead_id, fields in entries:
            identifier = text(dead_id)
            origin = text(fields.get(b"origin_stream", b""))
            if origin not in allowed:
                refused.append(f"{identifier}: origin {origin!r} is not a stream of the activity")
                continue
            reply: Any = await scripts().replay_dead_letter(client, [dead, origin], [identifier])
            outcome = text(reply[0])
            if outcome == "replayed":
                replayed += 1
                log.info("dead letter %s replayed to %s as %s", identifier, origin, text(reply[1]))
            elif outcome != "not_found":  # replayed by someone else meanwhile
                refused.append(f"{identifier}: {outcome}")
        cursor = "(" + text(entries[-1][0])
    return replayed, refused
