"""Reserve stock and define activities over the Lua scripts; knows nothing of HTTP."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from redis.asyncio import Redis

from seckill import keys
from seckill.activities import Activity
from seckill.errors import Conflict, RedisUnavailable
from seckill.orders.record import OrderRecord
from seckill.scripts import CONNECTION_ERRORS, Coalescer, Scripts

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What reserve_stock.lua decided."""

    OK = "ok"
    REPLAY = "replay"
    NOT_FOUND = "not_found"
    REUSED = "reused"
    GATED = "gated"
    NOT_STARTED = "not_started"
    ENDED = "ended"
    LIMIT_REACHED = "limit_reached"
    SOLD_OUT = "sold_out"


_OUTCOMES = {o.value.encode(): o for o in Outcome}


@dataclass(frozen=True, slots=True)
class Reservation:
    outcome: Outcome
    order_id: str = ""
    quantity: int = 0
    expires_at_ms: int = 0
    stock_left: int | None = None
    gate: str = ""


def fingerprint(quantity: int) -> str:
    """What makes two order bodies "the same" for idempotency: their parsed content."""
    return f"q={quantity}"


class Stock:
    """The purchase path's view of Redis."""

    def __init__(
        self, client: Redis, scripts: Scripts, coalescer: Coalescer, idempotency_ttl_s: int
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._coalescer = coalescer
        self._idempotency_ttl_s = idempotency_ttl_s

    async def reserve(
        self, activity_id: str, user_id: str, idempotency_key: str, quantity: int, gate: str = ""
    ) -> Reservation:
        """Pre-lock ``quantity`` for the user and queue the order, or say why not."""
        script_keys = keys.reserve_keys(activity_id, user_id, idempotency_key)
        # a random id colliding with a live order is all but impossible; a fresh one is safe
        for _ in range(3):
            args: list[str | int] = [
                user_id,
                quantity,
                fingerprint(quantity),
                keys.new_order_id(activity_id),
                self._idempotency_ttl_s,
                gate,
            ]
            reply = await self._coalescer.call(self._scripts.reserve_stock, script_keys, args)
            code = reply[0]
            if code == b"collision":
                continue
            outcome = _OUTCOMES.get(code)
            if outcome is None:
                return Reservation(Outcome.GATED, gate=code.decode())
            if outcome is Outcome.OK:
                return Reservation(
                    outcome, reply[1].decode(), int(reply[2]), int(reply[3]), int(reply[4])
                )
            if outcome is Outcome.REPLAY:
                return Reservation(outcome, reply[1].decode(), int(reply[2]), int(reply[3]))
            return Reservation(outcome)
        raise RuntimeError("order id collided three times")  # pragma: no cover

    async def put_activity(self, activity: Activity) -> str:
        """Create or replace (before its start) an activity and load its stock; Conflict else."""
        reply = await self._scripts.create_activity(
            self._client, keys.activity_keys(activity.id), activity.script_args()
        )
        if reply[0] == b"conflict":
            raise Conflict(reply[1].decode())
        try:
            await self._client.sadd(keys.ACTIVITIES, activity.id)
            await self._client.publish(keys.EVENTS_CHANNEL, f"activity:{activity.id}")
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        result: str = reply[0].decode()
        return result

    async def activity(self, activity_id: str) -> Activity | None:
        """The activity's definition, or None."""
        try:
            meta = await self._client.hgetall(keys.meta(activity_id))
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return Activity.from_meta(meta) if meta else None  # type: ignore[arg-type]

    async def order(self, order_id: str) -> OrderRecord | None:
        """The live order record Redis holds, or None."""
        activity_id = keys.activity_of_order(order_id)
        if activity_id is None:
            return None
        try:
            blob = await self._client.hget(keys.orders(activity_id), order_id)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return OrderRecord.unpack(blob) if isinstance(blob, bytes) else None
