"""Reserve stock and define activities over the Lua scripts; knows nothing of HTTP."""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from redis import exceptions as redis_errors

from seckill import buckets, keys, lottery
from seckill.activities import Activity
from seckill.connections import Client
from seckill.errors import Conflict, Overloaded, RedisUnavailable
from seckill.orders.record import OrderRecord
from seckill.scripts import CONNECTION_ERRORS, Coalescer, Scripts

if TYPE_CHECKING:
    from seckill.skus import OrderTerms

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
    UNKNOWN_SKU = "unknown_sku"
    RISK_REFUSED = "risk_refused"
    STALE = "stale"  # the gateway's cached definition is not Redis's: re-read it
    NOT_REGISTERED = "not_registered"
    NOT_YOUR_TURN = "not_your_turn"  # retry_after_ms says when to look again, turn says why
    UNDRAWN = "undrawn"  # a lottery past its start whose draw is not installed yet


_OUTCOMES = {o.value.encode(): o for o in Outcome}


def _holds_an_order(reply: Any) -> bool:
    """A reply that answers 202 (a new order, or a replay of one): with durability
    "replicated" it is given only once a replica holds the order. A refusal wrote nothing a
    buyer was promised (a token bucket or a risk counter lost in a failover is harmless)."""
    return bool(reply[0] in (b"ok", b"replay"))


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-user and per-IP token buckets of one activity (rate 0: no such limit)."""

    user_rate: float = 0.0
    user_burst: float = 0.0
    ip_rate: float = 0.0
    ip_burst: float = 0.0
    admission_rate: float = 0.0
    admission_burst: float = 0.0
    shadow: bool = False

    def per_bucket(self, count: int) -> Limits:
        """The limits one of ``count`` buckets enforces: each has an admission bucket of its
        own (one key would pin one slot again), so each admits its share of the rate."""
        if count == 1 or not self.admission_rate:
            return self
        return replace(
            self,
            admission_rate=self.admission_rate / count,
            admission_burst=max(self.admission_burst / count, 1.0),
        )


NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Reservation:
    outcome: Outcome
    order_id: str = ""
    quantity: int = 0
    expires_at_ms: int = 0
    stock_left: int | None = None
    gate: str = ""
    retry_after_ms: int = 0
    sku_left: int | None = None  # what is left of the order's SKU
    # risk rules that hit ((rule, "enforce" | "shadow"), shadow ones included)
    risk_hits: tuple[tuple[str, str], ...] = ()
    turn: str = ""  # not_your_turn: waiting, passed or used


class Release(enum.Enum):
    """What release_stock.lua decided."""

    RELEASED = "released"
    NOT_FOUND = "not_found"
    NOT_CANCELLABLE = "not_cancellable"
    NOT_DUE = "not_due"
    PREPAID = "prepaid"  # an expiry the payment provider must settle first (prepay placed)


class Payment(enum.Enum):
    """What confirm_payment.lua decided."""

    PAID = "paid"
    REFUND_REQUIRED = "refund_required"
    IGNORED = "ignored"
    NOT_FOUND = "not_found"
    AMOUNT_MISMATCH = "amount_mismatch"
    CONFLICT = "conflict"  # the event id is bound to another order or payload
    GONE = "gone"  # the order has left Redis: the store says how it ended


_RELEASES = {r.value.encode(): r for r in Release}
_PAYMENTS = {p.value.encode(): p for p in Payment}

# payment providers retry callbacks for days; their answers are kept well beyond that
PAYMENT_EVENT_TTL_S = 30 * 86_400
# states an order leaves Redis in (it never comes back from them)
TERMINAL = frozenset({"paid", "cancelled", "expired"})

# reserve_stock.lua's RISK_ARGV: where the risk rules' arguments start
_RISK_ARGV = 22

RetiredLookup = Callable[[str], Awaitable[OrderRecord | None]]


def _full(exc: redis_errors.ResponseError) -> Overloaded | None:
    """Redis at maxmemory (noeviction) refuses writes: fail closed with a 503, lose nothing.

    The scripts check before they write, so a refused write changed nothing; reads (a replay,
    sold_out) still answer. None for any other error reply (raised as it is).
    """
    # redis-py names the OOM reply OutOfMemoryError (and strips its prefix)
    if isinstance(exc, redis_errors.OutOfMemoryError) or str(exc).startswith("OOM"):
        return Overloaded("the stock service is full, retry later", retry_after=2)
    return None


@contextlib.contextmanager
def _refused_when_full() -> Iterator[None]:
    """_full for the calls in its block."""
    try:
        yield
    except redis_errors.ResponseError as exc:
        full = _full(exc)
        if full is None:
            raise
        raise full from exc


def payment_hash(event_id: str, order_id: str, amount_cents: int, success: bool) -> str:
    """What makes two callbacks of one event "the same": sha256 of their parsed content.

    Parsed, not raw: a provider that re-sends an event with other whitespace or key order is
    still sending the same event; any change of order, amount or status is another payload.
    """
    content = json.dumps(
        [event_id, order_id, amount_cents, "SUCCESS" if success else "FAILED"],
        separators=(",", ":"),
    )
    return hashlib.sha256(content.encode()).hexdigest()


def fingerprint(quantity: int, sku_id: str = "", address_hash: str = "") -> str:
    """What makes two order bodies "the same" for idempotency: their parsed content.

    The address enters as its keyed hash: the fingerprint is stored in Redis in clear.
    """
    text = f"q={quantity}"
    if sku_id:
        text += f";s={sku_id}"
    if address_hash:
        text += f";a={address_hash}"
    return text


def risk_hits(tail: Any) -> tuple[tuple[str, str], ...]:
    """The script's trailing {"risk", "<rule>:<mode>", ...} as (rule, mode) pairs."""
    return tuple(
        (rule, mode) for rule, _, mode in (item.decode().partition(":") for item in tail[1:])
    )


class Stock:
    """The purchase path's view of Redis."""

    def __init__(
        self, client: Client, scripts: Scripts, coalescer: Coalescer, idempotency_ttl_s: int
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._coalescer = coalescer
        self._idempotency_ttl_s = idempotency_ttl_s
        self.buckets = buckets.Buckets(client, scripts)

    async def close(self) -> None:
        """Finish the script calls in flight and close their connections."""
        await self._coalescer.close()

    async def reserve(
        self,
        activity_id: str,
        user_id: str,
        idempotency_key: str,
        quantity: int,
        gate: str = "",
        limits: Limits = NO_LIMITS,
        ip: str = "",
        terms: OrderTerms | None = None,
        risk: tuple[Sequence[str], Sequence[str | int]] | None = None,
        fair: bool = False,
    ) -> Reservation:
        """Pre-lock ``quantity`` for the user and queue the order, or say why not.

        ``activity_id``: the activity, or the user's bucket's key space (buckets.home).
        ``risk``: the risk rules' (KEYS, ARGV), appended at reserve_stock.lua's RISK_KEYS and
        RISK_ARGV. ``fair``: the activity takes registrations (its turn keys go first, at
        TURN_KEYS).
        """
        script_keys = keys.reserve_keys(activity_id, user_id, idempotency_key, ip, fair)
        if risk is not None:
            script_keys += risk[0]
        # a random id colliding with a live order is all but impossible; a fresh one is safe
        body = (
            fingerprint(quantity, terms.fingerprint_sku, terms.address_hash)
            if terms is not None
            else fingerprint(quantity)
        )
        for _ in range(3):
            # minted here, not in Lua: the address is sealed to this id before the script runs
            order_id = keys.new_order_id(activity_id)
            args: list[str | int | float] = [
                user_id,
                quantity,
                body,
                order_id,
                self._idempotency_ttl_s,
                gate,
                limits.user_rate,
                limits.user_burst,
                limits.ip_rate if ip else 0,
                limits.ip_burst,
                "shadow" if limits.shadow else "enforce",
                limits.admission_rate,
                limits.admission_burst,
            ]
            if terms is not None:
                args += terms.script_args(order_id)
            if risk is not None:
                args += [""] * (_RISK_ARGV - 1 - len(args))  # ARGV[14..21] at their defaults
                args += risk[1]
            try:  # not the context manager: a generator per order on the storm's path
                reply = await self._coalescer.call(
                    self._scripts.reserve_stock, script_keys, args, _holds_an_order
                )
            except redis_errors.ResponseError as exc:
                full = _full(exc)
                if full is None:
                    raise
                raise full from exc
            hits: tuple[tuple[str, str], ...] = ()
            if isinstance(reply[-1], list) and reply[-1][:1] == [b"risk"]:
                hits = risk_hits(reply[-1])
                reply = reply[:-1]
            code = reply[0]
            if code == b"collision":
                continue
            if code == b"rate_limited":
                # {"rate_limited", scope, ms} from a Redis bucket; {"rate_limited"} as a gate
                retry_ms = int(reply[2]) if len(reply) > 2 else 0
                return Reservation(
                    Outcome.GATED, gate="rate_limited", retry_after_ms=retry_ms, risk_hits=hits
                )
            outcome = _OUTCOMES.get(code)
            if outcome is None:
                return Reservation(Outcome.GATED, gate=code.decode(), risk_hits=hits)
            if outcome is Outcome.OK:
                return Reservation(
                    outcome,
                    reply[1].decode(),
                    int(reply[2]),
                    int(reply[3]),
                    int(reply[4]),
                    sku_left=int(reply[5]) if len(reply) > 5 else None,
                    risk_hits=hits,
                )
            if outcome is Outcome.REPLAY:
                return Reservation(outcome, reply[1].decode(), int(reply[2]), int(reply[3]))
            if outcome in (Outcome.NOT_YOUR_TURN, Outcome.UNDRAWN):
                return Reservation(outcome, retry_after_ms=int(reply[1]), turn=reply[2].decode())
            return Reservation(outcome, risk_hits=hits)
        raise RuntimeError("order id collided three times")  # pragma: no cover

    async def release(
        self, order_id: str, cause: str, owner: str = "", *, settled: bool = False
    ) -> Release:
        """Cancel (owner given) or expire (owner "") a reserved order; stock goes back once.

        An expiry of an order with a prepay answers PREPAID unless ``settled`` (the payment
        provider said nobody paid and nobody can any more).
        """
        space = keys.space_of_order(order_id)
        if space is None:
            return Release.NOT_FOUND
        activity_id = buckets.activity_of_space(space)
        with _refused_when_full():
            # coalesced: with durability "replicated" the answer waits for a replica too
            reply = await self._coalescer.call(
                self._scripts.release_stock,
                keys.release_keys(space),
                [order_id, cause, owner, "settled" if settled else ""],
            )
        outcome = _RELEASES[reply[0]]
        if outcome is Release.RELEASED:
            try:
                await self._client.publish(keys.EVENTS_CHANNEL, f"restock:{activity_id}")
            except CONNECTION_ERRORS:
                log.warning(
                    "restock of %s not announced; processes re-read within 1 s", activity_id
                )
        return outcome

    async def pay(
        self,
        order_id: str,
        event_id: str,
        amount_cents: int,
        success: bool,
        payload_hash: str = "",
        provider: str = "seckill",
        retired: RetiredLookup | None = None,
        paid_at_ms: int = 0,
    ) -> Payment:
        """Apply one payment callback, exactly once per (provider, event id).

        ``paid_at_ms``: when a provider whose answers are signed says the money was taken; the
        deadline is then judged by it, not by the arrival (0: by the arrival).

        The event id is first bound to (order, payload) under an untagged key, so the same id
        on another activity's order is seen even on Redis Cluster; the script then applies the
        event and stores its answer in the order's own slot. ``retired`` looks an order up in
        the store once it has left Redis (a late callback still gets its answer).
        """
        space = keys.space_of_order(order_id)
        if space is None:
            return Payment.NOT_FOUND
        payload_hash = payload_hash or payment_hash(event_id, order_id, amount_cents, success)
        with _refused_when_full():
            return await self._pay(
                space,
                order_id,
                event_id,
                amount_cents,
                success,
                payload_hash,
                provider,
                retired,
                paid_at_ms,
            )

    async def _pay(
        self,
        space: str,
        order_id: str,
        event_id: str,
        amount_cents: int,
        success: bool,
        payload_hash: str,
        provider: str,
        retired: RetiredLookup | None,
        paid_at_ms: int = 0,
    ) -> Payment:
        binding_key = keys.payment_binding(provider, event_id)
        binding = f"{order_id} {payload_hash}"
        if not await self._bind(binding_key, binding):
            return Payment.CONFLICT
        args: list[str | int | float] = [
            order_id,
            event_id,
            amount_cents,
            "SUCCESS" if success else "FAILED",
            PAYMENT_EVENT_TTL_S,
            payload_hash,
            provider,
            0,  # the quantity, once the order has left Redis
            "",  # and its unit price
            paid_at_ms or "",
        ]
        script_keys = keys.payment_keys(space, event_id, provider)
        reply = await self._coalescer.call(self._scripts.confirm_payment, script_keys, args)
        outcome = _PAYMENTS[reply[0]]
        if outcome is Payment.GONE:
            record = await retired(order_id) if retired is not None else None
            if record is None or record.status not in TERMINAL:
                outcome = Payment.NOT_FOUND
            else:
                args[7:9] = [record.quantity, record.price_cents]
                reply = await self._coalescer.call(self._scripts.confirm_payment, script_keys, args)
                outcome = _PAYMENTS[reply[0]]
        if outcome in (Payment.NOT_FOUND, Payment.AMOUNT_MISMATCH, Payment.GONE):
            # nothing was stored for the event: a corrected callback may use its id
            await self._scripts.unbind_payment_event(self._client, [binding_key], [binding])
            if outcome is Payment.GONE:
                outcome = Payment.NOT_FOUND
        return outcome

    async def _bind(self, key: str, binding: str) -> bool:
        """Bind an event id to (order, payload); False when it is bound to something else."""
        try:
            for _ in range(3):
                if await self._client.set(key, binding, nx=True, ex=PAYMENT_EVENT_TTL_S):
                    return True
                current: Any = await self._client.get(key)
                if current is not None:
                    return bool(current.decode() == binding)
                # expired between the two calls: bind again
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return False  # pragma: no cover - three expiries in a row

    async def due(self, activity_id: str, now_ms: int, limit: int, skip: int = 0) -> list[str]:
        """Reserved orders of the activity whose payment deadline has passed (after ``skip``)."""
        try:
            members: Any = await self._client.zrangebyscore(
                keys.deadlines(activity_id), "-inf", now_ms, start=skip, num=limit
            )
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return [m.decode() for m in members]

    async def forget_deadline(self, activity_id: str, order_id: str) -> None:
        """Drop a deadline whose order is no longer reserved."""
        try:
            await self._client.zrem(keys.deadlines(activity_id), order_id)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    async def spaces(self) -> list[str]:
        """Every key space holding orders: the activities' and their buckets'."""
        return await buckets.key_spaces(self._client)

    async def activity_ids(self) -> list[str]:
        """Every activity ever defined."""
        try:
            members: Any = await self._client.smembers(keys.ACTIVITIES)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return sorted(m.decode() for m in members)

    async def put_activity(self, activity: Activity) -> str:
        """Create or replace (before its start) an activity and load its stock; Conflict else.

        A lottery gets its seed here, committed at once; a replacement keeps the first seed.
        """
        seed = lottery.new_seed() if activity.lottery else ""
        try:
            before: Any = await self._client.hget(keys.meta(activity.id), "buckets")
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        # bucket 0 first: its script refuses a replacement that came too late, before any
        # other bucket is touched (none sells before the start, so none holds orders)
        result = ""
        for index, space in enumerate(buckets.spaces(activity.id, activity.buckets)):
            args = activity.script_args(seed, lottery.commitment(seed) if seed else "", index)
            # coalesced: with durability "replicated" the answer waits for a replica too
            reply = await self._coalescer.call(
                self._scripts.create_activity, keys.activity_keys(space), args
            )
            if reply[0] == b"conflict":
                raise Conflict(reply[1].decode())
            result = result or reply[0].decode()
        try:
            dropped = buckets.spaces(activity.id, int(before or 1))[activity.buckets :]
            for space in dropped:  # a replacement with fewer buckets
                await self._client.delete(*keys.activity_keys(space))
                await self._client.srem(keys.BUCKETS, space)
            await self._client.sadd(keys.ACTIVITIES, activity.id)
            if activity.buckets > 1:
                await self._client.sadd(
                    keys.BUCKETS, *buckets.spaces(activity.id, activity.buckets)[1:]
                )
            await self._client.publish(keys.EVENTS_CHANNEL, f"activity:{activity.id}")
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
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
        space = keys.space_of_order(order_id)
        if space is None:
            return None
        try:
            blob = await self._client.hget(keys.orders(space), order_id)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return OrderRecord.unpack(blob) if isinstance(blob, bytes) else None

    async def redis_now_ms(self) -> int:
        """Redis's own clock (TIME), the one every script decides deadlines by."""
        try:
            seconds, micros = await self._client.time()
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return int(seconds) * 1000 + int(micros) // 1000
