"""A hot item's stock split over buckets: key spaces in as many slots, so one item's storm is
shared by as many Redis Cluster shards.

An activity with ``buckets`` N > 1 keeps bucket 0 in its own key space and bucket k in
``keys.bucket(id, k)``, each a full copy of what a purchase touches (meta, stock, holders,
orders, streams, counters, idempotency, rate buckets). A buyer is routed to one home bucket by
a stable hash of (activity, user), so everything per user, the per-user limit above all, lives
in one slot and stays exact. When the home bucket cannot serve an order, units are moved to it
from the other buckets (``transfer_out.lua`` journals them at the giver, ``transfer_in.lua``
takes them in once at home, then the journal entry goes) and the order is tried again; sold out
is answered only once the buckets together have nothing left (``left``), so nobody is told sold
out while another bucket still has stock. A move cut short by a crash stays journaled; the
sweeper finishes it (``recover``).
"""

from __future__ import annotations

import logging
import random
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from seckill import keys
from seckill.connections import Client
from seckill.errors import RedisUnavailable
from seckill.scripts import CONNECTION_ERRORS, Scripts

log = logging.getLogger(__name__)

# a journal entry older than this is taken to be abandoned (its mover crashed or lost Redis);
# a live mover finishes within one round trip or two, and finishing twice is harmless
ABANDONED_MS = 5_000
# how long a bucket remembers a transfer it took in (transfer_in.lua): far beyond any journal
# entry's life, which the sweeper ends within seconds of ABANDONED_MS
ARRIVALS_KEPT_MS = 7 * 86_400_000


def home(activity_id: str, buckets: int, user_id: str) -> str:
    """The key space of the user's bucket: the same for every process and every request."""
    if buckets == 1:
        return activity_id
    index = zlib.crc32(f"{activity_id}\0{user_id}".encode()) % buckets
    return keys.bucket(activity_id, index)


def spaces(activity_id: str, buckets: int) -> list[str]:
    """Every bucket's key space of the activity, bucket 0 (the activity's own) first."""
    return [keys.bucket(activity_id, k) for k in range(buckets)]


def activity_of_space(space: str) -> str:
    """The activity a key space belongs to."""
    return space.partition(".")[0]


# a bucket's counters that say what it has left (left_of)
LEFT_FIELDS = ("initial_stock", "reserved", "paid")


def left_of(counts: Sequence[Any]) -> int:
    """Units for sale in a bucket or in transit from it, from its LEFT_FIELDS (see Survey)."""
    initial, reserved, paid = counts
    return int(initial or 0) - int(reserved or 0) - int(paid or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def spaces_of(client: Client, activity_id: str) -> list[str]:
    """Every bucket's key space of the activity, as its stored definition says."""
    try:
        count: Any = await client.hget(keys.meta(activity_id), "buckets")
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable() from exc
    return spaces(activity_id, int(count or 1))


async def key_spaces(client: Client) -> list[str]:
    """Every key space that holds orders: each activity's, and its buckets' (sorted).

    The background loops (writer, sweeper, retirer, payments) walk these, so an order in any
    bucket is written, expired, retired and settled like any other.
    """
    try:
        activities: Any = await client.smembers(keys.ACTIVITIES)
        extra: Any = await client.smembers(keys.BUCKETS)
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable() from exc
    return sorted({_text(m) for m in activities} | {_text(m) for m in extra})


@dataclass(frozen=True, slots=True)
class Survey:
    """What an activity's buckets hold, read bucket after bucket.

    ``left``: units for sale in all buckets together, those in transit included. Per bucket,
    initial - reserved - paid == stock + moved_out - moved_in: it changes only when that bucket
    sells or takes back, never when units move. Each bucket's figure is read atomically (one
    HMGET), the buckets one after another; while nothing is given back each figure only falls,
    so a sum below q means fewer than q were left at the end of the reading.
    ``on_sale``: each bucket's stock as read, a hint of where to move units from.
    """

    left: int
    on_sale: dict[str, int]


class Buckets:
    """Moves stock between the buckets of an activity, and adds up what they hold."""

    def __init__(self, client: Client, scripts: Scripts) -> None:
        self._client = client
        self._scripts = scripts

    async def refill(self, survey: Survey, to: str, want: int) -> int:
        """Move up to ``want`` units into bucket ``to`` from the others; how many came.

        The givers are those the survey saw holding stock, the fullest first (ties in a random
        order, so buyers of one home bucket do not all drain the same neighbour).
        """
        givers = [s for s, held in survey.on_sale.items() if s != to and held > 0]
        random.shuffle(givers)
        givers.sort(key=lambda s: -survey.on_sale[s])
        moved = 0
        for giver in givers:
            moved += await self._move(giver, to, want - moved)
            if moved >= want:
                break
        return moved

    async def _move(self, giver: str, to: str, want: int) -> int:
        transfer = secrets.token_hex(8)
        reply = await self._scripts.transfer_out(
            self._client, keys.transfer_out_keys(giver), [transfer, to, want]
        )
        moved = int(reply[0])
        if moved:
            await self._arrive(giver, transfer, to, moved)
        return moved

    async def _arrive(self, giver: str, transfer: str, to: str, quantity: int) -> None:
        """Take a journaled transfer in at its destination (once), then drop its entry."""
        await self._scripts.transfer_in(
            self._client, keys.transfer_in_keys(to), [transfer, quantity, ARRIVALS_KEPT_MS]
        )
        try:
            await self._client.hdel(keys.moves(giver), transfer)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    async def survey(self, activity_id: str, buckets: int) -> Survey:
        """What the buckets hold, in one pipelined round trip (see Survey)."""
        pipe = self._client.pipeline(transaction=False)
        every = spaces(activity_id, buckets)
        for space in every:
            pipe.hmget(keys.counters(space), *LEFT_FIELDS)
            pipe.get(keys.stock(space))
        try:
            replies = await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        left = sum(left_of(counts) for counts in replies[::2])
        return Survey(left, {s: int(v or 0) for s, v in zip(every, replies[1::2], strict=True)})

    async def left(self, activity_id: str, buckets: int) -> int:
        """Units still for sale in all buckets together, those in transit included."""
        return (await self.survey(activity_id, buckets)).left

    async def recover(self, space: str, now_ms: int) -> int:
        """Finish the moves journaled in ``space`` before now - ABANDONED_MS; how many."""
        try:
            journal: Any = await self._client.hgetall(keys.moves(space))
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        finished = 0
        for transfer, entry in journal.items():
            to, quantity, at_ms = _text(entry).split()
            if int(at_ms) > now_ms - ABANDONED_MS:
                continue
            await self._arrive(space, _text(transfer), to, int(quantity))
            finished += 1
        if finished:
            log.warning("finished %d stock moves out of %s cut short", finished, space)
        return finished
