"""The replication fence: what the writer read is on a replica before the store gets it."""

from __future__ import annotations

import asyncio

from seckill import keys
from seckill.connections import Client
from seckill.orders.entries import Entry, activity_of
from seckill.scripts import Coalescer, Scripts


class Fence:
    """Confirms that a replica holds the entries in hand (durability = "replicated").

    A 202 waits for a replica, but an order whose WAIT ran out stays on the primary (the
    client's retry replays it) and the writer may read it at once. Were the primary to die
    then, the promoted replica would never have had it, and the store would keep an order that
    nobody was told about and that Redis no longer knows. So before a commit the writer bumps
    a counter in each key space it read from and WAITs for it on the same connection:
    replication is ordered, so a replica that acknowledges the bump holds every entry read
    before it.
    """

    def __init__(self, client: Client, replica_wait_ms: int, scripts: Scripts | None = None):
        self._script = (scripts or Scripts.from_dir()).replication_fence
        self._coalescer = Coalescer(
            client, max_batch=16, in_flight=2, replica_wait_ms=replica_wait_ms
        )

    async def confirm(self, entries: list[Entry]) -> None:
        """Return once a replica holds the entries; else NotReplicated or RedisUnavailable."""
        spaces = sorted({activity_of(entry.stream) for entry in entries})
        replies = await asyncio.gather(
            *(self._coalescer.call(self._script, [keys.fence(space)], []) for space in spaces),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply

    async def close(self) -> None:
        await self._coalescer.close()
