"""Lua scripts: read once from lua/, called by SHA, coalesced into pipelined round trips."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection

from seckill import resources
from seckill.connections import Client, Gate, GatedCluster
from seckill.errors import NotReplicated, RedisUnavailable
from seckill.pipe import Pipes

log = logging.getLogger(__name__)

Arg = str | int | float | bytes

# Failures that mean "Redis did not answer": the caller fails closed (503), and a retried
# request is safe because every script is idempotent under its Idempotency-Key.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua file, known by its SHA1."""

    name: str
    source: str
    sha: str

    @classmethod
    def from_file(cls, path: Path) -> Script:
        source = _inline(path)
        return cls(path.stem, source, hashlib.sha1(source.encode()).hexdigest())

    async def __call__(self, client: Client, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """EVALSHA, loading the script on NOSCRIPT (e.g. after a Redis restart)."""
        try:
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            except redis_errors.NoScriptError:
                await client.script_load(self.source)
                return await client.evalsha(self.sha, len(keys), *keys, *args)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every script seckill runs."""

    reserve_stock: Script
    create_activity: Script
    release_stock: Script
    confirm_payment: Script
    set_flag: Script
    take_token: Script
    retire_orders: Script
    unbind_payment_event: Script
    report_snapshot: Script
    record_prepay: Script
    refund_update: Script
    risk_velocity: Script
    risk_deny: Script
    register: Script
    install_draw: Script
    queue_position: Script
    holders_snapshot: Script
    transfer_out: Script
    transfer_in: Script
    replication_fence: Script

    @classmethod
    def from_dir(cls, directory: Path | None = None) -> Scripts:
        directory = directory or resources.lua_dir()
        return cls(
            **{
                name: Script.from_file(directory / f"{name}.lua")
                for name in cls.__dataclass_fields__
            }
        )

    def all(self) -> list[Script]:
        return [getattr(self, name) for name in self.__dataclass_fields__]

    async def load(self, client: Client) -> None:
        """SCRIPT LOAD every script (at start and after Redis lost its script cache)."""
        for script in self.all():
            sha = await client.script_load(script.source)
            if sha != script.sha:  # pragma: no cover - would mean a Redis bug
                raise RuntimeError(f"Redis returned sha {sha} for {script.name}")

    async def loaded(self, client: Client) -> bool:
        """True when Redis holds every script (readiness)."""
        flags = await client.script_exists(*(s.sha for s in self.all()))
        return all(flags)


def _inline(path: Path) -> str:
    """The script's text with each ``--! include NAME`` replaced by NAME's library part.

    Redis scripts cannot load other files; a shared function (the token bucket) is written
    once in its own file, above a ``--! standalone`` marker, and inlined where it is used.
    """
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("--! include "):
            library = (path.parent / line.removeprefix("--! include ").strip()).read_text()
            lines.append(library.split("--! standalone", 1)[0])
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


# which replies of a call must reach a replica before they are given (None: every reply)
Durable = Callable[[Any], bool] | None
_Call = tuple[Script, Sequence[str], Sequence[Arg], "asyncio.Future[Any]", Durable]

# A failover under way: the call was not run where it was sent; ask the slot map again.
_MOVING = (
    redis_errors.AskError,  # MOVED too
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.ReadOnlyError,
)
# Rounds of a cluster batch (the first send included) before its calls answer 503: about
# 0.1 + 0.2 + 0.4 + 0.5 s of pauses, enough for a failover's last steps once the replica is
# promoted, short of holding a buyer for the whole node timeout. The breaker covers longer.
FAILOVER_ATTEMPTS = 5


def pack_frame(script: Script, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
    """One EVALSHA in RESP, packed in C; ValueError for an argument that is not
    str, int, float or bytes (as redis-py refuses None and bools)."""
    command: Any = (b"EVALSHA", script.sha, len(keys), *keys, *args)  # (its stub: 1-tuples)
    try:
        frame: bytes = hiredis.pack_command(command)
        return frame
    except TypeError as exc:
        raise ValueError(f"{script.name}: {exc}") from None


def _unavailable(cause: BaseException) -> RedisUnavailable:
    error = RedisUnavailable()
    error.__cause__ = cause
    return error


async def _exchange(connection: AbstractConnection, frames: bytes, count: int) -> list[Any]:
    """Write the frames, read ``count`` replies; an error reply is kept as its exception."""
    await connection.send_packed_command(frames, check_health=False)
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response())
        except redis_errors.ResponseError as exc:
            replies.append(exc)
    return replies


def _replicas(reply: Any) -> int:
    """WAIT's answer; an error reply (a replica itself cannot WAIT) counts as none."""
    return reply if isinstance(reply, int) else 0


class Coalescer:
    """Coalesces the script calls of concurrent requests into pipelined round trips.

    One ``await script(...)`` per request spends most of its time in a network round trip and
    the client's per-call overhead. Calls made while a pipeline is in flight wait for the next
    one, so under load each round trip carries many calls; at low load a call goes out on the
    next loop iteration. At most ``in_flight`` pipelines (pooled connections) are used at once.

    ``replica_wait_ms`` (durability = "replicated"): each pipeline ends with one
    ``WAIT 1 <ms>`` on its own connection (WAIT counts the writes of the connection it is sent
    on), so the cost is one replica acknowledgement per batch, not per order. When no replica
    confirms in time, every durable reply of the batch becomes NotReplicated (503): the write
    is on the primary only, and a retry replays it, itself in a WAITed batch.
    """

    def __init__(
        self,
        client: Client,
        *,
        max_batch: int,
        in_flight: int,
        replica_wait_ms: int | None = None,
    ) -> None:
        self._client = client
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._wait_ms = replica_wait_ms or 0
        self._wait = (
            hiredis.pack_command((b"WAIT", 1, replica_wait_ms))  # type: ignore[arg-type]
            if replica_wait_ms is not None
            else b""
        )
        # one Redis node: batches on pipelined connections of their own (None: redis-py's)
        self._pipes = Pipes.for_client(client, in_flight)
        self._pending: list[_Call] = []
        self._senders = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def replicated(self) -> bool:
        """Whether replies wait for a replica (durability = "replicated")."""
        return bool(self._wait)

    def call(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Arg],
        durable: Durable = None,
    ) -> asyncio.Future[Any]:
        """Queue one EVALSHA; the future gets its reply, RedisUnavailable, or NotReplicated.

        ``durable`` tells the replies that must reach a replica before they are given (a
        refusal wrote nothing and needs none); None: every reply.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, future, durable))
        if not self._scheduled:
            self._scheduled = True
            # next iteration: every request parsed from this batch of reads joins the pipeline
            loop.call_soon(self._start_senders)
        return future

    def _start_senders(self) -> None:
        self._scheduled = False
        while self._pending and self._senders < self._in_flight:
            self._senders += 1
            task = asyncio.create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._execute(batch)
        finally:
            self._senders -= 1

    async def _execute(self, batch: list[_Call]) -> None:
        try:
            replies, replicas = await self._pipeline(batch)
            missing = [
                i for i, r in enumerate(replies) if isinstance(r, redis_errors.NoScriptError)
            ]
            if missing:
                # NOSCRIPT means "not run" (a restarted node, a promoted replica): loading and
                # resending those calls is safe
                for script in {batch[i][0] for i in missing}:
                    await self._client.script_load(script.source)
                retried, again = await self._pipeline([batch[i] for i in missing])
                for n, i in enumerate(missing):
                    replies[i], replicas[i] = retried[n], again[n]
        except CONNECTION_ERRORS as exc:
            for *_, future, _ in batch:
                if not future.done():
                    future.set_exception(_unavailable(exc))
            return
        except BaseException as exc:
            for *_, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (*_, future, durable), reply, confirmed in zip(batch, replies, replicas, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            elif confirmed < 1 and (durable is None or durable(reply)):
                future.set_exception(NotReplicated())
            else:
                future.set_result(reply)

    async def _pipeline(self, batch: list[_Call]) -> tuple[list[Any], list[int]]:
        """Each call's reply, and how many replicas confirmed it (1 when nothing waits)."""
        if isinstance(self._client, RedisCluster):
            return await self._cluster_pipeline(self._client, batch)
        if self._pipes is not None:
            return await self._piped(self._pipes, batch)
        # the primary a Sentinel names (or a TLS connection): the frames packed by hiredis (C) and
        # written on a pooled connection. redis-py's pipeline packed each argument in Python,
        # the largest single cost of the purchase path (~26 us of ~35 arguments per order,
        # against ~3.5 us here).
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        answered = False
        try:
            # the client's retry policy (one immediate reconnect on a connection error: every
            # pooled connection is stale after a Redis restart; a Sentinel-managed connection
            # turns READONLY from a demoted primary into one, and reconnects to the primary
            # the Sentinels name now); safe because every script is idempotent under its key
            replies: tuple[list[Any], list[int]] = await connection.retry.call_with_retry(
                lambda: self._exchange(connection, batch),
                lambda _error: connection.disconnect(),
            )
            answered = True
            return replies
        finally:
            if not answered:
                # replies may still be on their way (cancelled mid-read): never reuse the socket
                await connection.disconnect(nowait=True)
            await pool.release(connection)

    async def _exchange(
        self, connection: AbstractConnection, batch: list[_Call]
    ) -> tuple[list[Any], list[int]]:
        """One round trip: the batch's frames (then WAIT), each call's reply and replicas."""
        frames = b"".join([pack_frame(script, keys, args) for script, keys, args, *_ in batch])
        replies = await _exchange(connection, frames + self._wait, len(batch) + bool(self._wait))
        return self._confirmed(replies, len(batch))

    async def _piped(self, pipes: Pipes, batch: list[_Call]) -> tuple[list[Any], list[int]]:
        """The batch on a pipelined connection (seckill/pipe.py): frames and WAIT in one write.

        A connection error is tried once more on a fresh connection (after a Redis restart
        every open socket is stale); safe because every script is idempotent under its key.
        """
        frames = b"".join([pack_frame(script, keys, args) for script, keys, args, *_ in batch])
        frames += self._wait
        count = len(batch) + bool(self._wait)
        try:
            replies = await pipes.exchange(frames, count)
        except redis_errors.ConnectionError:
            replies = await pipes.exchange(frames, count)
        return self._confirmed(replies, len(batch))

    def _confirmed(self, replies: list[Any], calls: int) -> tuple[list[Any], list[int]]:
        """The calls' replies, and how many replicas confirmed them (the WAIT's answer)."""
        if not self._wait:
            return replies, [1] * calls
        return replies[:-1], [_replicas(replies[-1])] * calls

    async def _cluster_pipeline(
        self, cluster: GatedCluster, batch: list[_Call]
    ) -> tuple[list[Any], list[int]]:
        """One round trip per master, in parallel: the calls grouped by the node that owns
        their slot (the client's slot map), each group ending with its own WAIT.

        Calls answered MOVED/ASK/TRYAGAIN/CLUSTERDOWN/READONLY, or lost with their node's
        connection (a failover under way), are sent again after the slot map is refreshed, at
        most FAILOVER_ATTEMPTS times with a growing pause; then they fail closed (503). Safe:
        every script is idempotent under its key, and a redirected call was not run.
        """
        replies: list[Any] = [None] * len(batch)
        replicas = [1] * len(batch)
        todo = list(range(len(batch)))
        for attempt in range(FAILOVER_ATTEMPTS):
            if attempt:
                await asyncio.sleep(min(0.05 * 2**attempt, 0.5))
                await cluster.nodes_manager.initialize()
            await cluster.initialize()  # the slot map, read once (a no-op after the first)
            groups: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in todo:
                keys = batch[i][1]
                node = (
                    cluster.nodes_manager.get_node_from_slot(cluster.keyslot(keys[0]))
                    if keys
                    else cluster.get_random_primary_node()  # a script of no key runs anywhere
                )
                groups.setdefault(node.name, (node, []))[1].append(i)
            results = await asyncio.gather(
                *(
                    self._node_exchange(cluster.gate, node, [batch[i] for i in calls])
                    for node, calls in groups.values()
                ),
                return_exceptions=True,
            )
            todo = []
            for (_, calls), result in zip(groups.values(), results, strict=True):
                if isinstance(result, CONNECTION_ERRORS):
                    todo += calls
                    for i in calls:
                        replies[i] = _unavailable(result)
                    continue
                if isinstance(result, BaseException):
                    raise result
                for i, reply, confirmed in zip(calls, *result, strict=True):
                    replies[i], replicas[i] = reply, confirmed
                    if isinstance(reply, _MOVING):
                        todo.append(i)
            if not todo:
                break
        for i in todo:
            if not isinstance(replies[i], RedisUnavailable):
                replies[i] = _unavailable(replies[i])  # still moving after every round: 503
        return replies, replicas

    async def _node_exchange(
        self, gate: Gate, node: ClusterNode, batch: list[_Call]
    ) -> tuple[list[Any], list[int]]:
        """One round trip on a connection of the cluster node's own pool, in turn with the
        client's other calls (the gate: the pool fails at its cap instead of waiting)."""
        async with gate.held():
            connection = node.acquire_connection()
            answered = False
            try:
                await node.disconnect_if_needed(connection)
                replies = await self._exchange(connection, batch)
                answered = True
                return replies
            finally:
                if not answered:
                    await connection.disconnect(nowait=True)
                node.release(connection)

    async def close(self) -> None:
        """Wait for the pipelines in flight, then close the pipelined connections (the
        client's own pool is its owner's to close)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pipes is not None:
            self._pipes.close()
