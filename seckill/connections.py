"""The Redis client for ``SECKILL_REDIS_URL``: one node, a Cluster or a Sentinel-managed primary.

Every process (gateway, writer, CLI) builds its client here, so the pool sizing and the retry
policy are decided once. A reply lost to a dropped connection may be retried: every script is
idempotent under its key (a lost reply becomes a replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import unquote

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff

if TYPE_CHECKING:
    from seckill.settings import RedisSettings

# A client of either shape: the command methods are the same; a cluster routes each command
# to the master of its keys' slot (one slot per activity, see keys.py).
Client: TypeAlias = "Redis | GatedCluster"

CLUSTER = "redis+cluster"
SENTINEL = "redis+sentinel"
SINGLE = frozenset({"redis", "rediss", "unix"})


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """A parsed ``redis+cluster://`` or ``redis+sentinel://`` URL."""

    scheme: str
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    name: str  # the Sentinel primary's name ("" for a cluster)


def parse(url: str) -> Target | None:
    """The cluster or sentinel target of ``url``; None for a single-node URL.

    ValueError (a message for a person) when the URL is neither.
    """
    scheme, sep, rest = url.partition("://")
    if scheme in SINGLE and sep and rest:
        return None
    if scheme not in {CLUSTER, SENTINEL} or not sep:
        raise ValueError(
            "expected redis://host:port/db, redis+cluster://host:port[,host:port…] or "
            "redis+sentinel://host:port[,host:port…]/<primary name>"
        )
    credentials, _, location = rest.rpartition("@")
    hosts, _, path = location.partition("/")
    name = path.strip("/")
    if scheme == SENTINEL and not name:
        raise ValueError("redis+sentinel:// needs the primary's name: …/<primary name>")
    if scheme == CLUSTER and name:
        raise ValueError("redis+cluster:// takes no path (a cluster has one database)")
    username, _, password = credentials.partition(":")
    return Target(
        scheme,
        tuple(_node(h) for h in hosts.split(",")),
        unquote(username) or None,
        unquote(password) or None,
        name,
    )


def _node(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def connect(settings: RedisSettings) -> Client:
    """A client for ``settings.url`` whose pool is sized on purpose."""
    target = parse(settings.url)
    if target is None:
        return Redis(connection_pool=_blocking_pool(settings))
    if target.scheme == CLUSTER:
        return _cluster(settings, target)
    return _sentinel(settings, target)


def _single_node_options(settings: RedisSettings) -> dict[str, Any]:
    return {
        "max_connections": settings.max_connections,
        # waits (bounded) for a free connection instead of failing
        "timeout": settings.socket_timeout_s,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        # one immediate reconnect on a connection error: after a Redis restart (or a
        # failover) every pooled connection is stale. Timeouts are not retried: latency
        # stays bounded.
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [redis_errors.ConnectionError],
    }


def _blocking_pool(settings: RedisSettings) -> BlockingConnectionPool:
    return BlockingConnectionPool.from_url(settings.url, **_single_node_options(settings))


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to whichever node the sentinels name primary, waiting (bounded) for a free
    one as the single-node pool does (redis-py's own sentinel pool fails at its cap)."""


def _sentinel(settings: RedisSettings, target: Target) -> Redis:
    timeouts = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
    }
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=timeouts)  # type: ignore[no-untyped-call]
    options = _single_node_options(settings)
    client: Redis = sentinel.master_for(
        target.name,
        connection_pool_class=BlockingSentinelPool,
        username=target.username,
        password=target.password,
        **options,
    )
    return client


def _cluster(settings: RedisSettings, target: Target) -> GatedCluster:
    return GatedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        gate=Gate(settings.max_connections, settings.socket_timeout_s),
        # the gate keeps every master under max_connections calls at once; the node pool has
        # as many again for connections still closing in the background after a reconnect mark
        # (they count against it until closed), plus the event subscription's
        max_connections=2 * settings.max_connections + 1,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        # a failover takes about cluster-node-timeout plus an election: a command that met a
        # dead master retries a few times with growing pauses (the client refreshes its slot
        # map between tries), then fails closed (503) rather than hold the request throughout
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
    )


class Gate:
    """At most ``size`` Redis calls of the process in flight; the others wait their turn, at
    most ``timeout_s``, then fail as a full pool does (MaxConnectionsError: 503).

    A Cluster node's pool fails at its cap instead of waiting, unlike the single-node
    BlockingConnectionPool. Each holder uses at most one connection of any one node at a time
    (a command, a pipeline's per-node batch, a coalesced batch), so no node pool meets its cap.
    """

    def __init__(self, size: int, timeout_s: float) -> None:
        self._slots = asyncio.Semaphore(size)
        self._timeout_s = timeout_s

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """One slot for the duration of one call."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise redis_errors.MaxConnectionsError("no Redis connection free in time") from None
        try:
            yield
        except (AttributeError, TypeError) as exc:
            if not dead_transport(exc):
                raise
            raise redis_errors.ConnectionError("connection closed under the call") from exc
        finally:
            self._slots.release()


class GatedCluster(RedisCluster):
    """A RedisCluster whose commands and pipelines pass through a :class:`Gate`."""

    def __init__(self, *args: Any, gate: Gate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # the slot map first: redis-py picks a command's node before it initializes, so the
        # first burst of a fresh client went to whichever node was default, MOVED by the others
        await self.initialize()
        async with self.gate.held():
            return await super().execute_command(*args, **kwargs)

    async def aclose(self) -> None:
        """Ask for a fresh slot map, closing nothing.

        redis-py calls this mid-traffic to refresh its slot map (every 5th MOVED, a pipeline's
        connection error or timeout, CLUSTERDOWN), and it closed every connection of every
        node, the ones other calls were using included: their replies were lost ("Connection
        closed by server" on the event subscription first, ``_writer`` None in a handshake),
        each loss the next refresh's cause. Now the next call re-reads the map, which marks
        the connections for a reconnect each takes in turn when free (redis-py's own lazy
        path). :func:`close` closes for good.
        """
        self._initialize = True

    async def close_all(self) -> None:
        """Close every connection (the client is not used again)."""
        await super().aclose()

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:  # refused by the parent, as redis-py does
            return super().pipeline(transaction, shard_hint)
        return GatedPipeline(self, transaction)  # type: ignore[abstract]  # (as redis-py's)


class GatedPipeline(ClusterPipeline):
    """A cluster pipeline that holds one slot of its client's gate while it runs."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        gate: Gate = self.cluster_client.gate  # type: ignore[attr-defined]
        async with gate.held():
            return await super().execute(raise_on_error, allow_redirections)


_REDIS_CONNECTION = Path(redis_errors.__file__).with_name("asyncio") / "connection.py"


def dead_transport(exc: BaseException) -> bool:
    """True for an AttributeError/TypeError raised inside redis-py's connection code: its
    socket (``_reader``/``_writer``) was set to None under it by a disconnect, a connection
    loss rather than a bug of ours (503 and retried, never a 500)."""
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return False
    return Path(traceback.tb_frame.f_code.co_filename) == _REDIS_CONNECTION


async def _disconnect_free_connections(self: ClusterNode) -> None:
    """redis-py 8.1's ClusterNode.disconnect_free_connections, without its race.

    After any ConnectionError or TimeoutError on a node (a socket timeout on a busy machine is
    enough), redis-py disconnects the node's idle connections while leaving them in its free
    queue: another task takes one meanwhile and writes on a socket closed under it (the
    event subscription reads "Connection closed by server", a command meets ``_writer`` None:
    AttributeError), and each such loss triggers the next round. Here the idle connections
    leave the queue while they close, so nobody else holds them, and come back disconnected
    (they reconnect on next use).
    """
    idle = list(self._free)
    self._free.clear()
    try:
        await asyncio.gather(*(c.disconnect() for c in idle), return_exceptions=True)
    finally:
        self._free.extend(idle)


ClusterNode.disconnect_free_connections = _disconnect_free_connections  # type: ignore[method-assign]


def is_cluster(client: Client) -> bool:
    """True for a Redis Cluster client (commands routed per slot, no cross-slot commands)."""
    return isinstance(client, RedisCluster)


async def close(client: Client) -> None:
    """Close the client and every pooled connection."""
    if isinstance(client, GatedCluster):
        await client.close_all()
        return
    await client.aclose()
    if isinstance(client, Redis):
        await client.connection_pool.disconnect()
