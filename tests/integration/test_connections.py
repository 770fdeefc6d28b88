"""The client built from SECKILL_REDIS_URL works on a Cluster and on a Sentinel primary."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from seckill import connections
from seckill import settings as settings_module
from seckill.errors import RedisUnavailable
from seckill.scripts import Coalescer, Script
from seckill.settings import RedisSettings
from seckill.topology import HOST, Cluster, Sentinels


def _redis_settings(url: str, max_connections: int = 16) -> RedisSettings:
    return settings_module.load(
        environ={
            "SECKILL_REDIS_URL": url,
            "SECKILL_REDIS_MAX_CONNECTIONS": str(max_connections),
            "SECKILL_REDIS_PIPELINES_IN_FLIGHT": "1",
            "SECKILL_REDIS_SOCKET_TIMEOUT_S": "5",
        }
    ).redis


def _keys_on_every_master(cluster: Cluster) -> list[str]:
    """One key per master (each under its own hash tag)."""
    found: dict[int, str] = {}
    for index in range(1000):
        key = f"{{conn{index}}}:n"
        found.setdefault(cluster.node_for_key(key).port, key)
        if len(found) == len(cluster.masters()):
            return list(found.values())
    raise AssertionError("no key found for some master")


async def test_coalesced_scripts_run_on_every_master_after_their_cache_is_lost(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    """The coalescer's cluster path routes each EVALSHA to its slot's master, and a master
    that lost its script cache (NOSCRIPT) gets the script loaded and the call re-sent."""
    source = tmp_path / "incr.lua"
    source.write_text("return redis.call('INCRBY', KEYS[1], ARGV[1])\n")
    script = Script.from_file(source)
    keys = _keys_on_every_master(redis_cluster)
    client = connections.connect(_redis_settings(redis_cluster.url))
    assert connections.is_cluster(client)
    coalescer = Coalescer(client, max_batch=64, in_flight=1)
    try:
        for master in redis_cluster.masters():
            redis.Redis(host=HOST, port=master.port).script_flush()
        first = await asyncio.gather(*(coalescer.call(script, [k], [2]) for k in keys))
        again = await asyncio.gather(*(coalescer.call(script, [k], [3]) for k in keys))
        assert first == [2] * len(keys)
        assert again == [5] * len(keys)
        for key in keys:
            owner = redis.Redis(host=HOST, port=redis_cluster.node_for_key(key).port)
            assert owner.get(key) == b"5"
    finally:
        await coalescer.close()
        await connections.close(client)


async def test_the_sentinel_client_waits_for_a_connection_and_follows_a_failover(
    redis_sentinels: Sentinels, tmp_path: Path
) -> None:
    """At its cap the pool waits for a free connection (as on one node) rather than failing;
    after the primary dies the same client, and the coalescer's packed pipelines on it, write
    to the promoted replica."""
    source = tmp_path / "incr.lua"
    source.write_text("return redis.call('INCRBY', KEYS[1], ARGV[1])\n")
    script = Script.from_file(source)
    client = connections.connect(_redis_settings(redis_sentinels.url, max_connections=1))
    coalescer = Coalescer(client, max_batch=64, in_flight=1)
    try:
        assert await coalescer.call(script, ["conn:n"], [1]) == 1
        # two blocking reads on one connection: the second waits for the first to end
        assert await asyncio.gather(
            client.blpop(["conn:none"], timeout=0.2), client.blpop(["conn:none"], timeout=0.2)
        ) == [None, None]
        await client.set("conn:before", "1")
        await client.wait(1, 5000)
        primary = redis_sentinels.master()
        redis_sentinels.kill(primary)
        promoted = redis_sentinels.wait_failover(primary)
        assert await _eventually(lambda: client.set("conn:after", "2"))
        assert await client.get("conn:before") == b"1"
        assert await _eventually(lambda: coalescer.call(script, ["conn:n"], [1]))
        assert await client.get("conn:n") == b"2"
        direct = redis.Redis(host=HOST, port=promoted.port)
        assert direct.get("conn:after") == b"2"
        direct.close()
        redis_sentinels.restart(primary)
        await asyncio.to_thread(redis_sentinels.wait_ok)
    finally:
        await coalescer.close()
        await connections.close(client)


async def _eventually(attempt: object, tries: int = 50) -> bool:
    """The first success of ``attempt()`` within ``tries`` (connection errors retried)."""
    assert callable(attempt)
    for _ in range(tries):
        try:
            return bool(await attempt())
        except (redis.ConnectionError, RedisUnavailable):
            await asyncio.sleep(0.2)
    pytest.fail("never succeeded")


async def test_an_evicting_master_of_a_cluster_is_refused(redis_cluster: Cluster) -> None:
    """Every master is asked: one left at allkeys-lru (not the first) refuses the cluster."""
    from seckill import eviction

    settings = settings_module.load(environ={"SECKILL_REDIS_URL": redis_cluster.url})
    assert await eviction.policy_refusal(settings) is None
    last = redis.Redis(host=HOST, port=redis_cluster.masters()[-1].port)
    last.config_set("maxmemory-policy", "allkeys-lru")
    try:
        refusal = await eviction.policy_refusal(settings)
    finally:
        last.config_set("maxmemory-policy", "noeviction")
        last.close()
    assert refusal is not None
    assert "'allkeys-lru' on " in refusal and str(redis_cluster.masters()[-1].port) in refusal


async def test_cluster_callers_wait_for_a_connection_instead_of_failing_at_the_cap(
    redis_cluster: Cluster,
) -> None:
    """Far more concurrent commands and pipelines than ``max_connections``: every one is
    answered (they wait their turn), none fails with MaxConnectionsError as redis-py's cluster
    node pool does at its cap."""
    client = connections.connect(_redis_settings(redis_cluster.url, max_connections=2))
    assert isinstance(client, connections.GatedCluster)
    key = _keys_on_every_master(redis_cluster)[2]

    async def pipelined(n: int) -> list[object]:
        pipe = client.pipeline(transaction=False)
        pipe.incrby(key, n)
        pipe.get(key)
        result: list[object] = await pipe.execute()
        return result

    try:
        await client.delete(key)
        await asyncio.gather(*(client.incrby(key, 1) for _ in range(200)))
        await asyncio.gather(*(pipelined(1) for _ in range(100)))
        assert await client.get(key) == b"300"
        nodes = client.get_nodes()
        assert max(len(node._connections) for node in nodes) <= 2
    finally:
        await connections.close(client)


async def test_idle_cluster_connections_are_not_handed_out_while_they_close(
    redis_cluster: Cluster,
) -> None:
    """After a connection error redis-py closes a node's idle connections; a connection taken
    from the node meanwhile is not one of them (redis-py 8.1 left them in the free queue: the
    taker's socket was closed under it, "Connection closed by server" or ``_writer`` None)."""
    client = connections.connect(_redis_settings(redis_cluster.url))
    assert isinstance(client, connections.GatedCluster)
    key = _keys_on_every_master(redis_cluster)[1]
    try:
        await client.delete(key)
        await asyncio.gather(*(client.incr(key) for _ in range(20)))  # idle connections
        node = client.get_node_from_key(key)
        assert node is not None and node._free
        closing = asyncio.create_task(node.disconnect_free_connections())
        await asyncio.sleep(0)  # the idle connections are closing
        connection = node.acquire_connection()
        await connection.connect()  # type: ignore[no-untyped-call]
        await closing
        assert connection.is_connected
        node.release(connection)
        assert await client.incr(key) == 21
    finally:
        await connections.close(client)
