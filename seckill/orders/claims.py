"""Who holds which entry: this writer's consumer name, its own pending entries, and the
entries of writers that are gone (taken over, then the empty consumer forgotten).

Functions here *return* the entries they claimed; the writer applies them.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import Any

from seckill import keys
from seckill.connections import Client
from seckill.orders.deadletters import scripts
from seckill.orders.entries import Entry, text
from seckill.orders.streams import GROUP

log = logging.getLogger(__name__)

SLOT_TTL_S = 30
MAX_SLOTS = 64


# Tells this process from an earlier one with the same pid (a container restarted in place
# runs its writer as pid 1 again).
_PROCESS = secrets.token_hex(4)


def _alive_here(holder: str) -> bool:
    """Whether the holder of a name ("<pid>:<process>:<writer>") may still run on this host."""
    pid_text, _, rest = holder.partition(":")
    process = rest.partition(":")[0]
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    if pid == os.getpid():
        # another Writer of this very process (only its TTL can tell), or an earlier process
        # that had our pid
        return process == _PROCESS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ConsumerSlot:
    """A stable consumer name for this writer: the host name, or host-N for the N-th writer.

    A restarted writer should come back under the name it had, so that it takes back its own
    pending entries at once (a random name leaves them to XAUTOCLAIM after claim_idle_ms, and
    the report counts them twice meanwhile). The first writer on a host is ``<hostname>``, a
    second one ``<hostname>-1``, and so on: each name is held by a Redis key (SET NX, 30 s TTL,
    refreshed every second) whose value names the holder's pid. A writer restarted after a crash
    finds its old name held by a pid that no longer runs on this host and takes it over at once
    instead of waiting for the TTL. Two writers starting in the very same instant after a crash
    may both take the dead one's name: they then share it, which costs only idempotent rewrites.
    """

    def __init__(self, client: Client, name: str | None = None) -> None:
        self.client = client
        self.fixed = name is not None
        self.host = socket.gethostname() or "writer"
        self.name = name or self.host
        self._token = f"{os.getpid()}:{_PROCESS}:{secrets.token_hex(4)}"
        self._claimed = self.fixed
        self._warned = False

    async def claim(self) -> str:
        """Take the first free name of this host (once; a configured name is used as given)."""
        if self._claimed:
            return self.name
        for index in range(MAX_SLOTS):
            name = self.host if index == 0 else f"{self.host}-{index}"
            key = keys.writer_consumer(name)
            if await self.client.set(key, self._token, nx=True, ex=SLOT_TTL_S):
                return self._took(name)
            holder: Any = await self.client.get(key)
            if holder is None:
                continue  # expired in between: the next round of the loop may get it
            if text(holder) == self._token or not _alive_here(text(holder)):
                await self.client.set(key, self._token, ex=SLOT_TTL_S)
                return self._took(name)
        # 64 live writers on one host: fall back to a unique, unstable name
        return self._took(f"{self.host}-{os.getpid()}-{secrets.token_hex(3)}")

    def _took(self, name: str) -> str:
        self.name = name
        self._claimed = True
        log.info("writer consumer name %s", name)
        return name

    async def keep(self) -> None:
        """Refresh the name's TTL (a no-op for a configured name)."""
        if self.fixed or not self._claimed:
            return
        key = keys.writer_consumer(self.name)
        holder: Any = await self.client.get(key)
        if holder is not None and text(holder) != self._token:
            if not self._warned:
                # our key expired while Redis was away and another writer took the name:
                # sharing it is harmless (rewrites are idempotent), renaming would strand entries
                log.warning("consumer name %s is now also held by %s", self.name, text(holder))
                self._warned = True
            return
        await self.client.set(key, self._token, ex=SLOT_TTL_S)

    async def release(self) -> None:
        """Give the name back on a clean stop, so a restart gets it at once."""
        if self.fixed or not self._claimed:
            return
        key = keys.writer_consumer(self.name)
        holder: Any = await self.client.get(key)
        if holder is not None and text(holder) == self._token:
            await self.client.delete(key)


def _entries(stream: str, messages: Any) -> list[Entry]:
    return [
        Entry(stream, text(entry_id), dict(fields) if fields is not None else None)
        for entry_id, fields in messages or []
    ]


async def own_pending(
    client: Client, stream: str, consumer: str, min_idle_ms: int, count: int, after: str = "-"
) -> list[Entry]:
    """Up to ``count`` of our own pending entries idle for ``min_idle_ms`` (XCLAIM resets idle).

    On start: every one of them whatever its age (a batch killed between commit and XACK, or
    entries the store refused). Later: only those refused and left for a retry.
    """
    pending: Any = await client.xpending_range(
        stream,
        GROUP,
        min=after,
        max="+",
        count=count,
        consumername=consumer,
        idle=min_idle_ms,
    )
    if not pending:
        return []
    ids: list[Any] = [text(p["message_id"]) for p in pending]
    messages: Any = await client.xclaim(stream, GROUP, consumer, min_idle_ms, ids)
    return _entries(stream, messages)


async def take_over(
    client: Client, stream: str, consumer: str, claim_idle_ms: int, count: int, cursor: str
) -> tuple[list[Entry], str]:
    """One XAUTOCLAIM page of entries other writers left pending: (entries, next cursor)."""
    reply: Any = await client.xautoclaim(
        stream, GROUP, consumer, claim_idle_ms, cursor, count=count
    )
    return _entries(stream, reply[1]), text(reply[0])


async def forget_gone(client: Client, stream: str, consumer: str, claim_idle_ms: int) -> int:
    """XGROUP DELCONSUMER every other consumer that holds nothing and idles past claim_idle_ms.

    Only once its entries were taken over (it holds none), and checked in the same atomic step
    as the removal, because DELCONSUMER drops whatever the consumer still holds.
    """
    consumers: Any = await client.xinfo_consumers(stream, GROUP)
    forgotten = 0
    for info in consumers:
        name = text(info["name"])
        if name == consumer or int(info["pending"]) > 0 or int(info["idle"]) < claim_idle_ms:
            continue
        removed: Any = await scripts().forget_consumer(
            client, [stream], [GROUP, name, claim_idle_ms]
        )
        if int(removed):
            forgotten += 1
            log.info("writer %s gone from %s: consumer removed", name, stream)
    return forgotten
