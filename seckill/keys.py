"""The only place Redis keys are spelled.

Every key of one activity carries the hash tag ``{a:<id>}`` so that the scripts, which touch
several of them at once, run unchanged on Redis Cluster (all keys of a script in one slot).
"""

from __future__ import annotations

import re
import secrets
from typing import Final

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
IDEMPOTENCY_KEY_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# An order id names its activity and, for a bucketed activity's buckets 1.., the bucket, so
# any process can find the order's keys (and its hash slot) from the id alone; the random part
# makes ids unguessable. "." is in no activity id, and a URL path carries it as it is.
ORDER_ID_PATTERN: Final = re.compile(r"([A-Za-z0-9_-]{1,64})(?:\.([0-9]{1,2}))?\.([0-9a-f]{20})")

PREFIX: Final = "sk"
ACTIVITIES: Final = f"{PREFIX}:activities"
# the key spaces of buckets 1.. of bucketed activities ("<id>.<k>"; bucket 0 is the activity's
# own): the background loops walk them beside the activities, whose keys they mirror
BUCKETS: Final = f"{PREFIX}:buckets"
EVENTS_CHANNEL: Final = f"{PREFIX}:events"


def _tag(activity_id: str) -> str:
    return f"{PREFIX}:{{a:{activity_id}}}"


def bucket(activity_id: str, index: int) -> str:
    """The key space of one bucket of an activity's stock: bucket 0 is the activity's own.

    Every function here that takes an activity id takes a bucket's key space as well: bucket
    k >= 1 has a hash tag of its own (``{a:<id>.<k>}``), so on Redis Cluster the buckets of
    one hot item spread over the slots, each holding the keys a purchase touches.
    """
    return activity_id if index == 0 else f"{activity_id}.{index}"


def meta(activity_id: str) -> str:
    """Hash of the activity's definition (times in epoch ms)."""
    return f"{_tag(activity_id)}:meta"


def stock(activity_id: str) -> str:
    """Integer: quantity still on sale."""
    return f"{_tag(activity_id)}:stock"


def holders(activity_id: str) -> str:
    """Hash user id -> quantity the user holds in live (reserved or paid) orders."""
    return f"{_tag(activity_id)}:holders"


def orders(activity_id: str) -> str:
    """Hash order id -> msgpack order record (the live copy the gateway answers from)."""
    return f"{_tag(activity_id)}:orders"


def deadlines(activity_id: str) -> str:
    """Sorted set order id -> payment deadline (epoch ms) of reserved orders."""
    return f"{_tag(activity_id)}:deadlines"


def stream(activity_id: str) -> str:
    """Stream of accepted orders (msgpack) for the order writer."""
    return f"{_tag(activity_id)}:stream"


def changes(activity_id: str) -> str:
    """Stream of status transitions and payment events (msgpack) for the order writer."""
    return f"{_tag(activity_id)}:changes"


def fence(activity_id: str) -> str:
    """Counter the writer bumps, then WAITs for, before it commits what it read (replicated)."""
    return f"{_tag(activity_id)}:fence"


def dead_letters(activity_id: str) -> str:
    """Stream of entries the writer gave up on after too many deliveries."""
    return f"{_tag(activity_id)}:dead"


def payment_event(activity_id: str, event_id: str) -> str:
    """String: the answer of one payment event as stored before events were bound (read only)."""
    return f"{_tag(activity_id)}:pay:{event_id}"


def counters(activity_id: str) -> str:
    """Hash of cumulative counts: orders_created, reserved, paid, released."""
    return f"{_tag(activity_id)}:counters"


def idempotency(activity_id: str, user_id: str, key: str) -> str:
    """String: the stored 202 answer of (user, activity, Idempotency-Key)."""
    # user ids may hold any character; a length prefix keeps user/key boundaries unambiguous
    return f"{_tag(activity_id)}:idem:{len(user_id)}:{user_id}:{key}"


def user_bucket(activity_id: str, user_id: str) -> str:
    """Hash: the (activity, user) rate-limit token bucket."""
    return f"{_tag(activity_id)}:rl:u:{user_id}"


def ip_bucket(activity_id: str, ip: str) -> str:
    """Hash: the (activity, client IP) rate-limit token bucket."""
    return f"{_tag(activity_id)}:rl:ip:{ip}"


# activity -> its part of reserve_stock.lua's KEYS that is the same for every buyer
_RESERVE_FIXED: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {}
_RESERVE_FIXED_MAX = 4096


def reserve_keys(
    activity_id: str, user_id: str, key: str, ip: str = "", fair: bool = False
) -> list[str]:
    """KEYS of reserve_stock.lua, in its order (``fair``: with the turn keys)."""
    fixed = _RESERVE_FIXED.get(activity_id)
    if fixed is None:
        if len(_RESERVE_FIXED) >= _RESERVE_FIXED_MAX:
            _RESERVE_FIXED.clear()
        fixed = _RESERVE_FIXED[activity_id] = (
            (
                meta(activity_id),
                stock(activity_id),
                holders(activity_id),
                orders(activity_id),
                deadlines(activity_id),
                stream(activity_id),
                counters(activity_id),
            ),
            _tag(activity_id),
            (f"{_tag(activity_id)}:rl:admission", sku_stock(activity_id)),
        )
    shared, tag, tail = fixed
    spelled = [
        *shared,
        f"{tag}:idem:{len(user_id)}:{user_id}:{key}",  # as idempotency()
        f"{tag}:rl:u:{user_id}",  # as user_bucket()
        f"{tag}:rl:ip:{ip or '-'}",  # as ip_bucket()
        *tail,
    ]
    if fair:
        spelled += turn_keys(activity_id)
    return spelled


def holders_snapshot_keys(activity_id: str) -> list[str]:
    """KEYS of holders_snapshot.lua, in its order."""
    return [stock(activity_id), counters(activity_id), holders(activity_id), sku_stock(activity_id)]


def risk_devices(activity_id: str, device_hash: str) -> str:
    """Set: users who bought in the activity with one device (its keyed hash; "-": none)."""
    return f"{_tag(activity_id)}:risk:dev:{device_hash or '-'}"


def risk_addresses(activity_id: str) -> str:
    """Hash keyed address hash -> orders created with that address in the activity."""
    return f"{_tag(activity_id)}:risk:addr"


def risk_reserve_keys(activity_id: str, device_hash: str) -> list[str]:
    """The risk rules' KEYS of reserve_stock.lua (appended from KEYS[RISK_KEYS])."""
    return [risk_devices(activity_id, device_hash), risk_addresses(activity_id)]


def velocity(kind: str, subject_hash: str) -> str:
    """Hash: attempts of one subject (user, device, ip) across activities, sliding window.

    Tagged by the subject itself, not an activity: velocity spans activities, and on Redis
    Cluster each subject's counter then sits in a slot of its own (risk_velocity.lua touches
    only this key).
    """
    return f"{PREFIX}:{{rv:{kind}:{subject_hash}}}"


# the deny list and the hits live together under one tag (admin writes, few and small)
RISK_DENY: Final = f"{PREFIX}:{{risk}}:deny"
RISK_DENY_EXPIRIES: Final = f"{PREFIX}:{{risk}}:deny:expiries"
RISK_DENY_VERSION: Final = f"{PREFIX}:{{risk}}:deny:version"
RISK_AUDIT: Final = f"{PREFIX}:{{risk}}:audit"
RISK_HITS: Final = f"{PREFIX}:{{risk}}:hits"


def release_keys(activity_id: str) -> list[str]:
    """KEYS of release_stock.lua, in its order."""
    return [
        stock(activity_id),
        holders(activity_id),
        orders(activity_id),
        deadlines(activity_id),
        changes(activity_id),
        counters(activity_id),
        retiring(activity_id),
        sku_stock(activity_id),
        prepays(activity_id),
        meta(activity_id),
        turns(activity_id),
        batches(activity_id),
    ]


def payment_keys(activity_id: str, event_id: str, provider: str = "seckill") -> list[str]:
    """KEYS of confirm_payment.lua, in its order."""
    return [
        meta(activity_id),
        orders(activity_id),
        deadlines(activity_id),
        changes(activity_id),
        counters(activity_id),
        payment_event_of(activity_id, provider, event_id),
        retiring(activity_id),
        payment_event(activity_id, event_id),
        refunds(activity_id),
        refunds_due(activity_id),
    ]


def prepays(activity_id: str) -> str:
    """Hash order id -> JSON of the payment order placed with the provider (record_prepay.lua)."""
    return f"{_tag(activity_id)}:prepays"


def refunds(activity_id: str) -> str:
    """Hash order id -> JSON refund record of a refund_required payment (refund_update.lua)."""
    return f"{_tag(activity_id)}:refunds"


def refunds_due(activity_id: str) -> str:
    """Sorted set order id -> when (ms) the refunder should next try that refund."""
    return f"{_tag(activity_id)}:refunds:due"


def prepay_keys(activity_id: str) -> list[str]:
    """KEYS of record_prepay.lua, in its order."""
    return [orders(activity_id), prepays(activity_id)]


def refund_keys(activity_id: str) -> list[str]:
    """KEYS of refund_update.lua, in its order."""
    return [refunds(activity_id), refunds_due(activity_id), changes(activity_id)]


def refund_number(out_refund_no: str) -> str:
    """String: the order id a provider's refund number stands for (refund notices name only
    the refund; no hash tag, since the activity is what is looked up)."""
    return f"{PREFIX}:refundno:{out_refund_no}"


SUSPICIOUS_PAYMENTS: Final = f"{PREFIX}:payments:suspicious"  # stream, capped: for a person


def activity_keys(activity_id: str) -> list[str]:
    """KEYS of create_activity.lua, in its order."""
    return [
        meta(activity_id),
        stock(activity_id),
        holders(activity_id),
        orders(activity_id),
        deadlines(activity_id),
        counters(activity_id),
        sku_stock(activity_id),
        draw(activity_id),
    ]


def new_order_id(space: str) -> str:
    """A fresh, unguessable order id that names its activity (and bucket: see ``bucket``)."""
    return f"{space}.{secrets.token_hex(10)}"


def activity_of_order(order_id: str) -> str | None:
    """The activity id an order id names, or None for a malformed id."""
    match = ORDER_ID_PATTERN.fullmatch(order_id)
    return match.group(1) if match else None


def space_of_order(order_id: str) -> str | None:
    """The key space holding the order (its activity's, or its bucket's), or None."""
    match = ORDER_ID_PATTERN.fullmatch(order_id)
    if match is None:
        return None
    return bucket(match.group(1), int(match.group(2) or 0))


def moves(space: str) -> str:
    """Hash transfer id -> "<to bucket> <quantity> <at ms>": stock a bucket gave away, in
    transit until the receiving bucket has it (transfer_out.lua, transfer_in.lua)."""
    return f"{_tag(space)}:moves"


def arrivals(space: str) -> str:
    """Sorted set transfer id -> when (ms) a bucket took it in: applied once, never twice."""
    return f"{_tag(space)}:arrivals"


def transfer_out_keys(space: str) -> list[str]:
    """KEYS of transfer_out.lua, in its order."""
    return [stock(space), counters(space), moves(space)]


def transfer_in_keys(space: str) -> list[str]:
    """KEYS of transfer_in.lua, in its order."""
    return [stock(space), counters(space), arrivals(space)]


def heartbeat(loop: str) -> str:
    """String with a TTL, refreshed while a background loop ("writer", "sweeper") is alive."""
    return f"{PREFIX}:heartbeat:{loop}"


def writer_consumer(name: str) -> str:
    """String with a TTL: "<pid>:<process>:<writer>" of the writer holding this consumer name."""
    return f"{PREFIX}:writer:consumer:{name}"


def retiring(activity_id: str) -> str:
    """Sorted set order id -> Redis time (ms) it reached a terminal state; the Retirer's queue."""
    return f"{_tag(activity_id)}:retiring"


def retire_keys(activity_id: str) -> list[str]:
    """KEYS of retire_orders.lua, in its order."""
    return [orders(activity_id), retiring(activity_id)]


def payment_event_of(activity_id: str, provider: str, event_id: str) -> str:
    """String: msgpack {order id, payload hash, answer} of one provider's payment event."""
    return f"{_tag(activity_id)}:payevt:{provider}:{event_id}"


def payment_binding(provider: str, event_id: str) -> str:
    """String "<order id> <payload hash>": binds an event id across activities (no hash tag).

    The event key above lives in the order's slot; an event id reused on another activity's
    order would land in another slot, so this untagged key (SET NX before the script) is what
    notices it on Redis Cluster.
    """
    return f"{PREFIX}:payevt:{provider}:{event_id}"


def report_keys(activity_id: str) -> list[str]:
    """KEYS of report_snapshot.lua, in its order."""
    return [
        counters(activity_id),
        stock(activity_id),
        holders(activity_id),
        orders(activity_id),
        stream(activity_id),
        changes(activity_id),
        dead_letters(activity_id),
        sku_stock(activity_id),
    ]


def sku_stock(activity_id: str) -> str:
    """Hash SKU id -> quantity of that SKU still on sale (one counter per SKU)."""
    return f"{_tag(activity_id)}:skus"


DATA_KEY_CHECKS: Final = f"{PREFIX}:datakeys"  # hash key id -> a probe encrypted under it


# A fair sale (registration, lottery, turns): lua/turns.lua explains each structure.


def registrants(activity_id: str) -> str:
    """Hash user id -> "<seq>|<device id>|<registered at ms>" of the users who registered."""
    return f"{_tag(activity_id)}:reg"


def registration_order(activity_id: str) -> str:
    """List of registered user ids in registration order (the draw's input, exportable)."""
    return f"{_tag(activity_id)}:reglist"


def registered_devices(activity_id: str) -> str:
    """Hash device id -> accounts registered with it for this activity."""
    return f"{_tag(activity_id)}:regdev"


def draw(activity_id: str) -> str:
    """Hash: a lottery's seed, commitment and, once drawn, drawn_at_ms, count, digest."""
    return f"{_tag(activity_id)}:draw"


def positions(activity_id: str) -> str:
    """Hash user id -> position in the lottery order (1-based), written once by the draw."""
    return f"{_tag(activity_id)}:pos"


def draw_staging(activity_id: str, nonce: str) -> str:
    """Hash: one drawer's positions before install_draw.lua swaps them in."""
    return f"{_tag(activity_id)}:pos:staging:{nonce}"


def draw_lock(activity_id: str) -> str:
    """String with a TTL: held by the one gateway computing the draw."""
    return f"{_tag(activity_id)}:draw:lock"


def turns(activity_id: str) -> str:
    """Hash: n (drawn), p (admitted up to), l (lapsed up to), open claims, b<end> claims used."""
    return f"{_tag(activity_id)}:turns"


def batches(activity_id: str) -> str:
    """Sorted set "<end>:<admitted at ms>" scored by end: admission batches still open."""
    return f"{_tag(activity_id)}:batches"


def claims(activity_id: str) -> str:
    """Hash user id -> the order id that used the user's turn."""
    return f"{_tag(activity_id)}:claims"


def turn_keys(activity_id: str) -> list[str]:
    """The fair sale's KEYS appended to reserve_stock.lua's (its TURN_KEYS + 0..4)."""
    return [
        registrants(activity_id),
        positions(activity_id),
        turns(activity_id),
        batches(activity_id),
        claims(activity_id),
    ]


def register_keys(activity_id: str) -> list[str]:
    """KEYS of register.lua, in its order."""
    return [
        meta(activity_id),
        registrants(activity_id),
        registration_order(activity_id),
        registered_devices(activity_id),
    ]


def install_draw_keys(activity_id: str, nonce: str) -> list[str]:
    """KEYS of install_draw.lua, in its order."""
    return [
        meta(activity_id),
        draw(activity_id),
        positions(activity_id),
        draw_staging(activity_id, nonce),
        turns(activity_id),
        batches(activity_id),
        stock(activity_id),
        registration_order(activity_id),
    ]


def queue_keys(activity_id: str) -> list[str]:
    """KEYS of queue_position.lua, in its order."""
    return [
        meta(activity_id),
        registrants(activity_id),
        positions(activity_id),
        turns(activity_id),
        batches(activity_id),
        stock(activity_id),
        claims(activity_id),
    ]
