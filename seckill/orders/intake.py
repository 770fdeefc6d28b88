"""Reading new entries: which streams exist, and fair batches across all of them.

``batch_size`` counts across every stream of every activity (one store transaction holds at
most that many rows), and the changes streams (payments, transitions) get a share of every
batch even while orders are catching up: a paid order must not stay "reserved" in the database
for the length of a catch-up. Orders are read first in each round, so an order's creation is
normally written before or with its changes; when it is not (another writer holds it), the
store inserts the order from the change's full record.
"""

from __future__ import annotations

import asyncio
from typing import Any

from seckill import keys
from seckill.buckets import key_spaces
from seckill.connections import Client, is_cluster
from seckill.orders.entries import Entry, activity_of, is_orders, text
from seckill.orders.streams import GROUP, ensure_group

# On a cluster a blocking read cannot span activities (their streams are in different slots):
# reads go out per activity without blocking, at most this many at once (the pool of each
# master is bounded), and a round that found nothing waits this long before the next.
CLUSTER_READS_IN_FLIGHT = 16
CLUSTER_IDLE_MS = 50

# The part of each batch kept for the changes streams while orders wait (they take it all
# when no change waits).
CHANGES_SHARE = 0.25


class Intake:
    """The streams this writer reads, and its fair reading of them."""

    def __init__(self, client: Client, batch_size: int, block_ms: int) -> None:
        self.client = client
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.streams: list[str] = []
        self._known: set[str] = set()
        self._turn = 0

    async def discover(self) -> list[str]:
        """Add the streams of new activities and buckets (creating the group); the new ones."""
        added: list[str] = []
        for activity_id in await key_spaces(self.client):
            for stream in (keys.stream(activity_id), keys.changes(activity_id)):
                if stream not in self._known:
                    await ensure_group(self.client, stream)
                    self._known.add(stream)
                    self.streams.append(stream)
                    added.append(stream)
        return added

    def forget(self) -> None:
        """Forget every stream: the next discover() recreates missing groups (after NOGROUP)."""
        self.streams.clear()
        self._known.clear()

    async def read(self, consumer: str, block: bool = True) -> list[Entry]:
        """At most batch_size new entries across all streams, changes always given a share."""
        if not self.streams:
            return []
        orders = [s for s in self.streams if is_orders(s)]
        changes = [s for s in self.streams if not is_orders(s)]
        share = max(1, int(self.batch_size * CHANGES_SHARE)) if changes else 0
        entries = await self._read(consumer, orders, self.batch_size - share, None)
        filled = len(entries) == self.batch_size - share
        entries += await self._read(consumer, changes, self.batch_size - len(entries), None)
        room = self.batch_size - len(entries)
        if filled and room > 0:
            # orders are catching up and changes left part of their share: orders take it
            entries += await self._read(consumer, orders, room, None)
        if not entries and block:
            entries = await self._read(consumer, self.streams, self.batch_size, self.block_ms)
        return entries

    async def _read(
        self, consumer: str, streams: list[str], budget: int, block_ms: int | None
    ) -> list[Entry]:
        """One XREADGROUP whose per-stream COUNTs add up to at most ``budget``."""
        if not streams or budget <= 0:
            return []
        # COUNT is per stream: with more streams than budget, read a rotating window of them
        if len(streams) > budget:
            start = self._turn % len(streams)
            self._turn += budget
            streams = (streams[start:] + streams[:start])[:budget]
        count = budget // len(streams)
        if is_cluster(self.client):
            return await self._read_per_activity(consumer, streams, count, block_ms)
        return await self._xreadgroup(consumer, streams, count, block_ms)

    async def _read_per_activity(
        self, consumer: str, streams: list[str], count: int, block_ms: int | None
    ) -> list[Entry]:
        """On a cluster: one non-blocking XREADGROUP per activity (its streams share a slot;
        two activities' need not), a few at a time; an idle round then waits briefly."""
        by_activity: dict[str, list[str]] = {}
        for stream in streams:
            by_activity.setdefault(activity_of(stream), []).append(stream)
        gate = asyncio.Semaphore(CLUSTER_READS_IN_FLIGHT)

        async def read(group: list[str]) -> list[Entry]:
            async with gate:
                return await self._xreadgroup(consumer, group, count, None)

        batches = await asyncio.gather(*(read(group) for group in by_activity.values()))
        entries = [entry for batch in batches for entry in batch]
        if not entries and block_ms is not None:
            await asyncio.sleep(min(block_ms, CLUSTER_IDLE_MS) / 1000)
        return entries

    async def _xreadgroup(
        self, consumer: str, streams: list[str], count: int, block_ms: int | None
    ) -> list[Entry]:
        reply: Any = await self.client.xreadgroup(
            GROUP, consumer, dict.fromkeys(streams, ">"), count=count, block=block_ms
        )
        return [
            Entry(text(stream), text(entry_id), dict(fields) if fields is not None else None)
            for stream, messages in reply or []
            for entry_id, fields in messages
        ]
