"""The local topologies tests and benchmarks run on: up, a node killed, failed over, back."""

from __future__ import annotations

import socket
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from seckill.embedded import EmbeddedRedis
from seckill.topology import HOST, PRIMARY_NAME, Cluster, Sentinels, _cluster_port


def test_cluster_spreads_slots_and_fails_over(redis_cluster: Cluster) -> None:
    """Three masters serve the slots; killing the one holding a key promotes its replica,
    which still has the key; the killed node comes back (as a replica) and the cluster is ok."""
    assert redis_cluster.url.startswith("redis+cluster://")
    assert len(redis_cluster.masters()) == 3
    client = RedisCluster(host=HOST, port=redis_cluster.nodes[0].port)
    try:
        owner = redis_cluster.node_for_key("{topology}key")
        writer = redis.Redis(host=HOST, port=owner.port)
        writer.set("{topology}key", "kept")
        # WAIT counts the writes of its own connection: the replica has it before the master dies
        assert writer.wait(1, 5000) >= 1
        writer.close()
        redis_cluster.kill(owner)
        promoted = redis_cluster.wait_failover(owner)
        assert promoted is not owner
        assert promoted is redis_cluster.node_for_key("{topology}key")
        redis_cluster.restart(owner)
        redis_cluster.wait_ok()
        assert owner not in redis_cluster.masters()
        assert len(redis_cluster.masters()) == 3
        direct = redis.Redis(host=HOST, port=promoted.port)
        assert direct.get("{topology}key") == b"kept"
        direct.close()
    finally:
        client.close()


def test_sentinels_promote_the_replica(redis_sentinels: Sentinels) -> None:
    """Killing the primary: the sentinels name the replica, which holds the primary's data."""
    assert redis_sentinels.url.endswith(f"/{PRIMARY_NAME}")
    primary = redis_sentinels.master()
    direct = redis.Redis(host=HOST, port=primary.port)
    direct.set("topology", "kept")
    direct.wait(1, 5000)
    direct.close()
    redis_sentinels.kill(primary)
    promoted = redis_sentinels.wait_failover(primary)
    assert promoted is not primary
    direct = redis.Redis(host=HOST, port=promoted.port)
    assert direct.get("topology") == b"kept"
    direct.close()
    redis_sentinels.restart(primary)
    redis_sentinels.wait_ok()
    # on a starved machine the sentinels may fail over once more (to the old primary, by now
    # its replica): whoever they name holds the data
    direct = redis.Redis(host=HOST, port=redis_sentinels.master().port)
    assert direct.get("topology") == b"kept"
    direct.close()


def test_a_node_whose_port_is_taken_before_it_binds_draws_another(tmp_path: Path) -> None:
    """A topology's node draws its port as it starts, and again when another process took it
    meanwhile (a cluster node once failed a fresh-clone run: its port, drawn when the cluster
    was built, was taken by the time it started)."""
    with socket.socket() as held:
        held.bind((HOST, 0))
        held.listen()
        taken = held.getsockname()[1]
        draws = [taken]

        def pick() -> int:
            return draws.pop() if draws else _cluster_port()

        node = EmbeddedRedis(
            tmp_path / "node",
            pick_port=pick,
            extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
        )
        try:
            node.start()
            assert node.running and node.port != taken and not draws
            assert redis.Redis(host=HOST, port=node.port).ping()
        finally:
            node.stop()
