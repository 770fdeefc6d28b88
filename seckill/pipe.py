"""Pipelined Redis connections for the coalesced script calls of one Redis node.

redis-py reads each reply through a coroutine of its own, under a timer of its own: on the
purchase path that cost as much as the script itself. Here a batch of pre-packed frames is
written at once, the bytes that come back are parsed by hiredis (C) as they arrive, and each
batch's future gets its replies in order; many batches may be in flight on one connection.
One timer per connection watches the oldest batch: a Redis that stops answering fails its
batches with a TimeoutError after ``timeout_s``, and the connection is dropped.

Everything else (reads, admin calls, the writer, Cluster and Sentinel) keeps redis-py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool


def _error(message: str) -> Exception:
    # the exception redis-py would raise for this error reply (NOSCRIPT, OOM, READONLY, ...)
    error: Exception = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


class _Batch:
    __slots__ = ("count", "future", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, sent_at: float) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] = []
        self.sent_at = sent_at


class _Connection(asyncio.Protocol):
    """One socket: batches answered in the order they were written."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader(protocolError=redis_errors.InvalidResponse, replyError=_error)
        self.waiting: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self._watch: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, frames: bytes, count: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        assert self.transport is not None
        self.waiting.append(_Batch(future, count, self._loop.time()))
        self.transport.write(frames)
        if self._watch is None:
            self._watch = self._loop.call_later(self._timeout_s, self._overdue)
        return future

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except redis_errors.InvalidResponse as exc:
                self._drop(exc)
                return
            if reply is False:
                return
            if not waiting:
                self._drop(redis_errors.InvalidResponse("a reply nobody asked for"))
                return
            batch = waiting[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.count:
                waiting.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis_errors.ConnectionError(f"Redis closed the connection: {exc or 'EOF'}"))
        self.transport = None

    def _overdue(self) -> None:
        self._watch = None
        if not self.waiting:
            return
        due = self.waiting[0].sent_at + self._timeout_s
        if self._loop.time() >= due:
            self._drop(redis_errors.TimeoutError(f"no reply from Redis in {self._timeout_s}s"))
        else:
            self._watch = self._loop.call_at(due, self._overdue)

    def _drop(self, exc: Exception) -> None:
        """Fail every batch in flight and close: the replies of this socket are lost."""
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    def _fail(self, exc: Exception) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        self._drop(redis_errors.ConnectionError("closed"))


@dataclass(frozen=True, slots=True)
class Address:
    """Where and how to connect: what the client's own pool was configured with."""

    host: str = ""
    port: int = 6379
    path: str = ""  # a unix socket
    username: str | None = None
    password: str | None = None
    db: int = 0
    timeout_s: float = 1.0
    connect_timeout_s: float = 1.0


class Pipes:
    """Up to ``size`` pipelined connections to one Redis node, opened as load needs them.

    ``exchange(frames, count)`` writes ``count`` commands' frames and returns their replies
    (an error reply as its exception); a batch goes on an idle connection if there is one,
    else on the least busy. A connection error fails the batches in flight on that socket
    (redis.ConnectionError); the next batch opens a fresh one.
    """

    def __init__(self, address: Address, size: int) -> None:
        self._address = address
        self._size = size
        self._connections: list[_Connection] = []
        self._opening: asyncio.Future[_Connection] | None = None
        self._handshake = _handshake(address)

    @classmethod
    def for_client(cls, client: Any, size: int) -> Pipes | None:
        """Pipes to the node a plain single-node client talks to; None for any other client
        (Cluster, Sentinel, TLS, a custom connection class): those keep redis-py's path."""
        if type(client) is not Redis:
            return None
        pool = client.connection_pool
        if not isinstance(pool, ConnectionPool) or isinstance(pool, SentinelConnectionPool):
            return None  # a Sentinel's primary moves: redis-py follows it
        if pool.connection_class not in (Connection, UnixDomainSocketConnection):
            return None  # TLS, or a connection class of the caller's own
        options = pool.connection_kwargs
        timeout = options.get("socket_timeout") or 5.0
        common: dict[str, Any] = {
            "username": options.get("username"),
            "password": options.get("password"),
            "db": int(options.get("db") or 0),
            "timeout_s": float(timeout),
            "connect_timeout_s": float(options.get("socket_connect_timeout") or timeout),
        }
        if issubclass(pool.connection_class, UnixDomainSocketConnection):
            return cls(Address(path=options["path"], **common), size)
        return cls(
            Address(host=options.get("host", "localhost"), port=int(options.get("port", 6379)),
                    **common),
            size,
        )  # fmt: skip

    async def exchange(self, frames: bytes, count: int) -> list[Any]:
        connection = self._idle()
        if connection is None:
            connection = await self._open()
        return await connection.send(frames, count)

    def _idle(self) -> _Connection | None:
        """An idle usable connection; else the least busy one when no more may be opened."""
        live = [c for c in self._connections if c.usable]
        self._connections = live
        for connection in live:
            if not connection.waiting:
                return connection
        if len(live) + (self._opening is not None) < self._size or not live:
            return None
        return min(live, key=lambda c: len(c.waiting))

    async def _open(self) -> _Connection:
        if self._opening is not None:
            # one connection opens at a time: the others share it
            return await asyncio.shield(self._opening)
        loop = asyncio.get_running_loop()
        self._opening = loop.create_future()
        try:
            connection = await self._connect(loop)
        except BaseException as exc:
            failed = self._opening
            self._opening = None
            error = (
                exc
                if isinstance(exc, redis_errors.RedisError)
                else redis_errors.ConnectionError(f"cannot connect to Redis: {exc!r}")
            )
            failed.set_exception(error)
            failed.exception()  # retrieved: nobody else may be waiting on it
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise error from exc
        self._connections.append(connection)
        opened, self._opening = self._opening, None
        opened.set_result(connection)
        return connection

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        a = self._address
        connection = _Connection(loop, a.timeout_s)
        async with asyncio.timeout(a.connect_timeout_s):
            if a.path:
                await loop.create_unix_connection(lambda: connection, a.path)
            else:
                await loop.create_connection(lambda: connection, a.host, a.port)
            if self._handshake:
                frames, count = self._handshake
                for reply in await connection.send(frames, count):
                    if isinstance(reply, Exception):
                        connection.close()
                        raise reply
        return connection

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections = []


def _handshake(address: Address) -> tuple[bytes, int] | None:
    """AUTH and SELECT as the client's own connections send them, or None."""
    commands: list[tuple[Any, ...]] = []
    if address.password is not None:
        if address.username:
            commands.append((b"AUTH", address.username, address.password))
        else:
            commands.append((b"AUTH", address.password))
    if address.db:
        commands.append((b"SELECT", address.db))
    if not commands:
        return None
    return b"".join(hiredis.pack_command(c) for c in commands), len(commands)
