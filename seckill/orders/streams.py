"""The writers' consumer group over the orders and changes streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

GROUP = "writers"


@dataclass(frozen=True, slots=True)
class Backlog:
    """What a stream holds that the store does not have yet."""

    pending: int  # delivered to a writer, not acknowledged
    undelivered: int  # not delivered to any writer yet

    @property
    def total(self) -> int:
        return self.pending + self.undelivered


async def ensure_group(client: Redis, stream: str) -> None:
    """Create the writers' group reading from the stream's very beginning (idempotent)."""
    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis_errors.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def _group(client: Redis, stream: str) -> dict[str, Any] | None:
    try:
        groups = await client.xinfo_groups(stream)
    except redis_errors.ResponseError:  # no such key
        return None
    for group in groups:
        name = group["name"]
        if (name.decode() if isinstance(name, bytes) else name) == GROUP:
            return dict(group)
    return None


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def backlog(client: Redis, stream: str) -> Backlog:
    """Pending + undelivered entries of the stream for the writers' group."""
    group = await _group(client, stream)
    if group is None:
        return Backlog(0, int(await client.xlen(stream)))
    lag = group.get("lag")
    if lag is None:
        # Redis cannot always tell (e.g. after deletions): count what follows the last delivery
        last = _id(group["last-delivered-id"])
        following: Any = await client.xrange(stream, min=f"({last}", max="+")
        lag = len(following)
    return Backlog(int(group["pending"]), int(lag))


async def trim_persisted(client: Redis, stream: str) -> int:
    """Drop entries below every one the writers have not acknowledged (never by length).

    Everything acknowledged was committed to the store first, so the entries strictly below the
    oldest pending one (or below the last delivered one, when none is pending) are safe to drop.
    """
    group = await _group(client, stream)
    if group is None:
        return 0
    floor = _id(group["last-delivered-id"])
    if int(group["pending"]) > 0:
        summary = await client.xpending(stream, GROUP)
        floor = _id(summary["min"])
    if floor in ("0-0", "0"):
        return 0
    trimmed: int = await client.xtrim(stream, minid=floor, approximate=False)
    return trimmed
