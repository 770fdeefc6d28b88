"""The writers' consumer group over the orders and changes streams: group, backlog, trim.

Every reading here costs O(1) or O(a page) whatever the stream holds: never "everything after
X". After an AOF replay, a promotion, an XDEL or an XGROUP SETID the group's ``lag`` is nil;
the backlog then comes from counters (``entries-added`` - ``entries-read``) when Redis still
knows them exactly, else from a bounded count reported as "at least N".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors

from seckill.connections import Client

GROUP = "writers"

# Entries counted at most when Redis cannot tell the lag: the cost of one backlog reading.
COUNT_BOUND = 100


@dataclass(frozen=True, slots=True)
class Backlog:
    """What a stream holds that the store does not have yet."""

    pending: int  # delivered to a writer, not acknowledged
    undelivered: int  # not delivered to any writer yet (a lower bound when at_least)
    at_least: bool = False  # undelivered was counted up to COUNT_BOUND and may be more

    @property
    def total(self) -> int:
        return self.pending + self.undelivered


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0))


async def ensure_group(client: Client, stream: str) -> None:
    """Create the writers' group reading from the stream's very beginning (idempotent)."""
    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis_errors.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def _group(client: Client, stream: str) -> dict[str, Any] | None:
    try:
        groups = await client.xinfo_groups(stream)
    except redis_errors.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    for group in groups:
        if _id(group["name"]) == GROUP:
            return dict(group)
    return None


async def undelivered(
    client: Client, stream: str, group: dict[str, Any], bound: int = COUNT_BOUND
) -> tuple[int, bool]:
    """Entries after the group's last delivery, in O(1) or O(bound): (count, at_least)."""
    lag = group.get("lag")
    if lag is not None:
        return int(lag), False
    last = _id(group["last-delivered-id"])
    entries_read = group.get("entries-read")
    if entries_read is not None:
        info: Any = await client.xinfo_stream(stream)
        deleted = _id(info.get("max-deleted-entry-id", "0-0"))
        # exact only while no entry after the last delivery was deleted (a tombstone there
        # would be counted as waiting)
        if _key(deleted) <= _key(last):
            return max(0, int(info["entries-added"]) - int(entries_read)), False
    following: Any = await client.xrange(stream, min=f"({last}", max="+", count=bound)
    return len(following), len(following) >= bound


async def backlog(client: Client, stream: str) -> Backlog:
    """Pending + undelivered entries of the stream for the writers' group, in O(1)."""
    group = await _group(client, stream)
    if group is None:
        # no group yet: nothing was ever delivered, so everything the stream holds waits
        return Backlog(0, int(await client.xlen(stream)))
    count, at_least = await undelivered(client, stream, group)
    return Backlog(int(group["pending"]), count, at_least)


async def oldest_waiting_ms(client: Client, stream: str) -> int | None:
    """Epoch ms of the oldest entry not yet acknowledged (pending or undelivered), or None."""
    group = await _group(client, stream)
    if group is None:
        first: Any = await client.xrange(stream, count=1)
        return _key(_id(first[0][0]))[0] if first else None
    if int(group["pending"]) > 0:
        summary: Any = await client.xpending(stream, GROUP)
        if summary.get("min") is not None:
            return _key(_id(summary["min"]))[0]
    last = _id(group["last-delivered-id"])
    following: Any = await client.xrange(stream, min=f"({last}", max="+", count=1)
    return _key(_id(following[0][0]))[0] if following else None


async def trim_persisted(client: Client, stream: str) -> int:
    """Drop entries below every one the writers have not acknowledged (never by length).

    Everything acknowledged was committed to the store first, so the entries strictly below the
    oldest pending one (or below the last delivered one, when none is pending) are safe to drop.
    Another writer may acknowledge between our two readings: the floor only rises, so the
    older reading is still safe.
    """
    group = await _group(client, stream)
    if group is None:
        return 0
    floor = _id(group["last-delivered-id"])
    if int(group["pending"]) > 0:
        summary: Any = await client.xpending(stream, GROUP)
        # None when the last pending entry was acknowledged in between: last-delivered holds
        if summary.get("min") is not None:
            floor = _id(summary["min"])
    if floor in ("0-0", "0"):
        return 0
    trimmed: int = await client.xtrim(stream, minid=floor, approximate=False)
    return trimmed
