"""The replication fence: what the writer read is on a replica before the store gets it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from seckill import keys
from seckill.connections import Client
from seckill.errors import NotReplicated
from seckill.orders.entries import Entry, activity_of
from seckill.scripts import Coalescer, Scripts


@dataclass(slots=True)
class Fenced:
    """The entries read, sorted by what a replica holds."""

    held: list[Entry] = field(default_factory=list)  # on a replica: may be stored
    waiting: list[Entry] = field(default_factory=list)  # no replica confirmed: read again later
    gone: list[Entry] = field(default_factory=list)  # no longer in Redis (a failover): never
    fault: BaseException | None = None  # why some wait


class Fence:
    """Sorts the entries in hand by whether a replica holds them (durability = "replicated").

    A 202 waits for a replica, but an order whose WAIT ran out stays on the primary (the
    client's retry replays it) and the writer may read it at once. Were the primary to die
    then, the promoted replica would never have had it, and the store would keep an order that
    nobody was told about and that Redis no longer knows. So before a commit the writer runs
    replication_fence.lua per stream (it checks the entries are on the node that runs it, then
    writes) and WAITs on the same connection: replication is ordered, so a replica that
    acknowledges the write holds every entry the node held. Key spaces are confirmed one by
    one: one shard without a replica holds back only its own entries.
    """

    def __init__(self, client: Client, replica_wait_ms: int, scripts: Scripts | None = None):
        self._script = (scripts or Scripts.from_dir()).replication_fence
        self._coalescer = Coalescer(
            client, max_batch=16, in_flight=2, replica_wait_ms=replica_wait_ms
        )

    async def sort(self, entries: list[Entry]) -> Fenced:
        """The entries a replica holds, those to read again, and those Redis lost."""
        fenced = Fenced()
        by_stream: dict[str, list[Entry]] = {}
        for entry in entries:
            if entry.fields is None:
                # deleted while pending: no order in it, only a dead letter to write
                fenced.held.append(entry)
            else:
                by_stream.setdefault(entry.stream, []).append(entry)
        streams = list(by_stream)
        replies = await asyncio.gather(
            *(
                self._coalescer.call(
                    self._script,
                    [keys.fence(activity_of(stream)), stream],
                    [entry.entry_id for entry in by_stream[stream]],
                )
                for stream in streams
            ),
            return_exceptions=True,
        )
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, NotReplicated):
                fenced.waiting += by_stream[stream]
                fenced.fault = reply
                continue
            if isinstance(reply, BaseException):
                raise reply  # Redis away or an error reply: the writer's fault handling
            missing = {m.decode() if isinstance(m, bytes) else str(m) for m in reply}
            for entry in by_stream[stream]:
                (fenced.gone if entry.entry_id in missing else fenced.held).append(entry)
        return fenced

    async def close(self) -> None:
        await self._coalescer.close()
