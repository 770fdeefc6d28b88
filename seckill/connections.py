"""The Redis client for ``SECKILL_REDIS_URL``: one node, a Cluster or a Sentinel-managed primary.

Every process (gateway, writer, CLI) builds its client here, so the pool sizing and the retry
policy are decided once. A reply lost to a dropped connection may be retried: every script is
idempotent under its key (a lost reply becomes a replay).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import unquote

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff

if TYPE_CHECKING:
    from seckill.settings import RedisSettings

# A client of either shape: the command methods are the same; a cluster routes each command
# to the master of its keys' slot (one slot per activity, see keys.py).
Client: TypeAlias = Redis | RedisCluster

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


def _cluster(settings: RedisSettings, target: Target) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        # per master: each serves only its own slots' commands
        max_connections=settings.max_connections,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        # a failover takes about cluster-node-timeout plus an election: a command that met a
        # dead master retries a few times with growing pauses (the client refreshes its slot
        # map between tries), then fails closed (503) rather than hold the request throughout
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
    )


def is_cluster(client: Client) -> bool:
    """True for a Redis Cluster client (commands routed per slot, no cross-slot commands)."""
    return isinstance(client, RedisCluster)


async def close(client: Client) -> None:
    """Close the client and every pooled connection."""
    await client.aclose()
    if isinstance(client, Redis):
        await client.connection_pool.disconnect()
