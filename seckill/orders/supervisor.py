"""Runs a background loop (writer, sweeper, …) for ever: restart with backoff, heartbeat.

A loop that ends by accident is the quietest way to lose a sale: the gateway keeps answering
202 while nothing reaches the database and no reservation expires. So a loop never runs bare.
Its supervisor restarts it after any exception (the first failure logged with its traceback,
the repeats as one line with a count), and publishes liveness as data: a Redis key with a TTL
(``keys.heartbeat(name)``) that the report, ``/readyz`` and the console read, and the
``up``/``restarts`` figures for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as redis_errors

from seckill import keys
from seckill.connections import Client

log = logging.getLogger(__name__)

Loop = Callable[[asyncio.Event], Awaitable[None]]


class Supervisor:
    """Keeps one named loop running until ``stop`` is set."""

    def __init__(
        self,
        name: str,
        loop: Loop,
        client: Client,
        *,
        heartbeat_interval_s: float = 1.0,
        heartbeat_ttl_s: float = 5.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        healthy_after_s: float = 30.0,
    ) -> None:
        self.name = name
        self._loop = loop
        self._client = client
        self._interval_s = heartbeat_interval_s
        self._ttl_ms = int(heartbeat_ttl_s * 1000)
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._healthy_after_s = healthy_after_s
        self._identity = f"{socket.gethostname()}:{os.getpid()}"
        self.up = False
        self.restarts = 0
        self.heartbeats = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Run the loop (again and again if it fails) until ``stop`` is set."""
        beating = asyncio.create_task(self._beat(stop))
        delay = self._backoff_initial_s
        failures = 0
        try:
            while not stop.is_set():
                self.up = True
                started = time.monotonic()
                try:
                    await self._loop(stop)
                    if stop.is_set():
                        return
                    raise RuntimeError(f"the {self.name} loop returned without being stopped")
                except Exception as exc:
                    self.up = False
                    self.restarts += 1
                    if time.monotonic() - started > self._healthy_after_s:
                        # it ran well for a while: a new fault, not the same one again
                        delay, failures = self._backoff_initial_s, 0
                    failures += 1
                    if failures == 1:
                        log.exception("%s loop failed; restarting in %.1fs", self.name, delay)
                    else:
                        log.error(
                            "%s loop failed again (%d in a row): %r; restarting in %.1fs",
                            self.name,
                            failures,
                            exc,
                            delay,
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    delay = min(delay * 2, self._backoff_max_s)
                    continue
        finally:
            self.up = False
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            await self._clear()

    async def _beat(self, stop: asyncio.Event) -> None:
        """Refresh the heartbeat key while the loop is up; a Redis error only skips a beat."""
        quiet = False
        while not stop.is_set():
            if self.up:
                try:
                    await self._client.set(
                        keys.heartbeat(self.name), self._identity, px=self._ttl_ms
                    )
                    self.heartbeats += 1
                    quiet = False
                except (redis_errors.RedisError, OSError) as exc:
                    if not quiet:
                        log.warning("%s heartbeat not written: %r", self.name, exc)
                        quiet = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)

    async def _clear(self) -> None:
        """A clean stop says so at once (another process's beat is left alone)."""
        with contextlib.suppress(redis_errors.RedisError, OSError):
            name = keys.heartbeat(self.name)
            current: Any = await self._client.get(name)
            if current is not None and current.decode() == self._identity:
                await self._client.delete(name)


async def alive(client: Client, name: str) -> bool:
    """Whether some process's ``name`` loop has beaten within its TTL."""
    return bool(await client.exists(keys.heartbeat(name)))
