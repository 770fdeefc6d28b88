"""One pub/sub listener per process on ``sk:events``, dispatching by message kind.

Messages are ``<kind>:<subject>`` (``soldout:<activity>``, ``flags:<name>`` …). Pub/sub is
fire-and-forget, so every subscriber also re-reads its state periodically and on reconnect;
the events only make convergence fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from seckill import keys
from seckill.connections import Client
from seckill.scripts import CONNECTION_ERRORS

log = logging.getLogger(__name__)

Handler = Callable[[str], None]
Resync = Callable[[], Awaitable[None]]


def reraise_pending_cancel() -> None:
    """Inside an ``except``: if this task is being cancelled, let the cancellation win.

    A client library may turn a cancellation into a connection error (an exception raised in a
    ``finally`` while the connection is torn down); a loop that swallows connection errors
    would then never stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Events:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._handlers: dict[str, Handler] = {}
        self._resyncs: list[Resync] = []
        self._closed = False

    def on(self, kind: str, handler: Handler, resync: Resync) -> None:
        """Call ``handler(subject)`` for each ``kind`` message; ``resync()`` after (re)connects."""
        self._handlers[kind] = handler
        self._resyncs.append(resync)

    def close(self) -> None:
        self._closed = True

    async def _subscription(self, turn: int) -> PubSub | ClusterPubSub:
        """A pub/sub connection; on a cluster to its ``turn``-th node (any node will do: a
        PUBLISH reaches every node over the cluster bus), so a dead node's successor is tried
        next instead of the slot map the client may not have refreshed yet."""
        if not isinstance(self._client, RedisCluster):
            return self._client.pubsub()
        await self._client.initialize()
        nodes = self._client.get_nodes()
        return self._client.pubsub(node=nodes[turn % len(nodes)])

    async def run(self) -> None:
        """Listen until closed (or cancelled), resubscribing after a lost connection."""
        turn = 0
        while not self._closed:
            pubsub = await self._subscription(turn)
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL)
                for resync in self._resyncs:  # events may have been missed meanwhile
                    await resync()
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message["type"] == "message":
                        kind, _, subject = message["data"].decode().partition(":")
                        handler = self._handlers.get(kind)
                        if handler is not None:
                            handler(subject)
            except CONNECTION_ERRORS:
                reraise_pending_cancel()
                log.warning("event subscription lost; resubscribing")
                turn += 1
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
