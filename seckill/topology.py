"""Local Redis topologies for tests and benchmarks: a Cluster, and a Sentinel-managed primary.

Every node is an :class:`~seckill.embedded.EmbeddedRedis` on a free loopback port with its own
directory, so any one of them can be killed (SIGKILL, a crash) and restarted on the same port
with its data. Timeouts are short on purpose: a failover takes seconds, not the production
default's tens of seconds.
"""

from __future__ import annotations

import abc
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import redis
from redis.crc import key_slot

from seckill.embedded import EmbeddedRedis, EmbeddedRedisError, free_port

HOST = "127.0.0.1"
PRIMARY_NAME = "seckill"
# how long a node may be silent before the others call it failed (cluster) or down (sentinel)
NODE_TIMEOUT_MS = 1000
CLUSTER_BUS_OFFSET = 10_000  # Redis Cluster's bus listens on port + 10000


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout_s}s")
        time.sleep(0.1)


def ask(node: EmbeddedRedis, *command: str) -> Any:
    """One command to one node, decoded; None when the node does not answer."""
    if not node.running:
        return None
    client = redis.Redis(
        host=HOST, port=node.port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True
    )
    try:
        return client.execute_command(*command)  # type: ignore[no-untyped-call]
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
        return None
    finally:
        client.close()


def _info(node: EmbeddedRedis, section: str) -> dict[str, Any]:
    reply = ask(node, "INFO", section)
    return reply if isinstance(reply, dict) else {}


def _replica_synced(node: EmbeddedRedis) -> bool:
    info = _info(node, "replication")
    return (
        info.get("role") == "slave"
        and info.get("master_link_status") == "up"
        and not info.get("master_sync_in_progress")
    )


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(64):
        port = free_port()
        bus = port + CLUSTER_BUS_OFFSET
        if bus < 65536 and _port_free(bus):
            return port
    raise OSError("no free port pair for a cluster node")


def _port_free(port: int) -> bool:
    """True when nothing listens on ``port`` at 127.0.0.1 (and it can be bound)."""

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


class Topology(abc.ABC):
    """What the cluster and the sentinel setup share: nodes to start, kill and restart."""

    nodes: list[EmbeddedRedis]

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The SECKILL_REDIS_URL that reaches this topology."""

    def kill(self, node: EmbeddedRedis) -> None:
        """SIGKILL one node (no AOF flush, no goodbye to its peers)."""
        node.kill()

    @abc.abstractmethod
    def client(self) -> redis.Redis | redis.RedisCluster:
        """A synchronous client for the data (tests: setting up, looking in)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Empty every master (replicas follow)."""

    def restart(self, node: EmbeddedRedis) -> None:
        """Start a killed node again on its port, from its own data."""
        node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class Cluster(Topology):
    """A Redis Cluster: ``masters`` masters with ``replicas`` replicas each, slots spread evenly."""

    def __init__(self, base_dir: Path, masters: int = 3, replicas: int = 1) -> None:
        self.replicas = replicas
        self._served: dict[int, list[int]] = {}
        self.nodes = [
            EmbeddedRedis(
                base_dir / f"node{index}",
                appendfsync="no",
                maxmemory="256mb",
                pick_port=_cluster_port,  # drawn as it starts: again if taken meanwhile
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                ),
            )
            for index in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a startup node."""
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 60.0) -> str:
        """Start every node, create the cluster, wait until it is ok and replicas are in sync."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise EmbeddedRedisError("redis-cli not found (it ships with redis-server)")
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [cli, "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                timeout=timeout_s,
            )  # fmt: skip
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def client(self) -> redis.RedisCluster:
        master = self.masters()[0]
        return redis.RedisCluster(host=HOST, port=master.port)

    def flush(self) -> None:
        for master in self.masters():
            ask(master, "FLUSHALL")

    def masters(self) -> list[EmbeddedRedis]:
        """The running nodes that are masters now."""
        return [n for n in self.nodes if _info(n, "replication").get("role") == "master"]

    def replicas_of(self, master: EmbeddedRedis) -> list[EmbeddedRedis]:
        """The running nodes replicating ``master``."""
        return [n for n in self.nodes if _info(n, "replication").get("master_port") == master.port]

    def node_for_slot(self, slot: int) -> EmbeddedRedis:
        """The master serving ``slot``, as the cluster itself says now."""
        for node in self.nodes:
            for start, end, master, *_ in ask(node, "CLUSTER", "SLOTS") or []:
                if start <= slot <= end:
                    return self._by_port(int(master[1]))
        raise LookupError(f"no node serves slot {slot}")

    def node_for_key(self, key: str) -> EmbeddedRedis:
        """The master holding ``key``'s slot."""
        return self.node_for_slot(key_slot(key.encode()))

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every running node says cluster_state:ok and every replica is in sync."""
        wait_until(self._ok, timeout_s, "cluster ok with replicas in sync")

    def kill(self, node: EmbeddedRedis) -> None:
        """SIGKILL one node, remembering the slots it served (for wait_failover)."""
        self._served[node.port] = self._slots_of(node)
        node.kill()

    def wait_failover(self, dead: EmbeddedRedis, timeout_s: float = 60.0) -> EmbeddedRedis:
        """After the master ``dead`` was killed: the replica promoted to serve its slots."""
        slots = self._served.get(dead.port)
        if not slots:
            raise LookupError(f"{HOST}:{dead.port} served no slots when it was killed")

        def promoted() -> bool:
            return self._ok() and self.node_for_slot(slots[0]) is not dead

        wait_until(promoted, timeout_s, f"failover of {HOST}:{dead.port}")
        return self.node_for_slot(slots[0])

    def _slots_of(self, node: EmbeddedRedis) -> list[int]:
        """The first slot of each range ``node`` serves, as the first answering peer says."""
        for peer in self.nodes:
            ranges = ask(peer, "CLUSTER", "SLOTS")
            if ranges:
                return [start for start, _, master, *_ in ranges if int(master[1]) == node.port]
        return []

    def _ok(self) -> bool:
        running = [n for n in self.nodes if n.running]
        states = [ask(n, "CLUSTER", "INFO") or "" for n in running]
        if not all("cluster_state:ok" in s for s in states):
            return False
        replicas = [n for n in running if _info(n, "replication").get("role") != "master"]
        return all(_replica_synced(n) for n in replicas)

    def _by_port(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)


class Sentinels(Topology):
    """One primary, ``replicas`` replicas and ``sentinels`` Sentinels watching them."""

    def __init__(self, base_dir: Path, replicas: int = 1, sentinels: int = 3) -> None:
        self._base_dir = base_dir
        self._replica_count = replicas
        self._sentinel_count = sentinels
        # every port is drawn as its node starts (and drawn again if another process took it
        # meanwhile); the replicas and the sentinels are made once the primary's is known
        self.primary = EmbeddedRedis(base_dir / "primary", appendfsync="no", maxmemory="256mb")
        self.replicas: list[EmbeddedRedis] = []
        self.sentinels: list[EmbeddedRedis] = []
        self.nodes = [self.primary]

    def _around(self, primary_port: int) -> None:
        """The replicas and the sentinels of the primary on ``primary_port``."""
        base = self._base_dir
        self.replicas = [
            EmbeddedRedis(
                base / f"replica{index}",
                appendfsync="no",
                maxmemory="256mb",
                extra_args=("--replicaof", HOST, str(primary_port)),
            )
            for index in range(self._replica_count)
        ]
        quorum = self._sentinel_count // 2 + 1
        self.sentinels = [
            self._sentinel(base / f"sentinel{index}", primary_port, quorum)
            for index in range(self._sentinel_count)
        ]
        self.nodes = [self.primary, *self.replicas, *self.sentinels]

    @staticmethod
    def _sentinel(directory: Path, primary_port: int, quorum: int) -> EmbeddedRedis:
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"  # Sentinel rewrites it: one per sentinel
        config.write_text(
            f"sentinel monitor {PRIMARY_NAME} {HOST} {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {PRIMARY_NAME} {NODE_TIMEOUT_MS}\n"
            f"sentinel failover-timeout {PRIMARY_NAME} {NODE_TIMEOUT_MS * 3}\n"
            f"sentinel parallel-syncs {PRIMARY_NAME} 1\n"
        )
        return EmbeddedRedis(directory, config_file=config, extra_args=("--sentinel",))

    @property
    def url(self) -> str:
        """``redis+sentinel://`` with every sentinel, naming the primary."""
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{PRIMARY_NAME}"

    @property
    def data_nodes(self) -> list[EmbeddedRedis]:
        return [self.primary, *self.replicas]

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the primary, its replicas and the sentinels; wait until all see each other."""
        try:
            self.primary.start()
            if len(self.nodes) == 1:
                self._around(self.primary.port)
            for node in self.nodes[1:]:
                node.start()
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.master().port)

    def flush(self) -> None:
        ask(self.master(), "FLUSHALL")

    def master(self) -> EmbeddedRedis:
        """The data node the (running) sentinels name as primary now."""
        ports = self._reported_ports()
        if len(ports) != 1:
            raise LookupError(f"sentinels disagree or none answers: {sorted(ports)}")
        port = ports.pop()
        return next(n for n in self.data_nodes if n.port == port)

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every sentinel names one running primary, knows its peers and every replica,
        and the replicas are in sync."""
        wait_until(self._ok, timeout_s, "sentinels agree, replicas in sync")

    def wait_failover(self, dead: EmbeddedRedis, timeout_s: float = 60.0) -> EmbeddedRedis:
        """After the primary ``dead`` was killed: the replica the sentinels promoted."""

        def promoted() -> bool:
            ports = self._reported_ports()
            if len(ports) != 1 or dead.port in ports:
                return False
            new = next(n for n in self.data_nodes if n.port in ports)
            return _info(new, "replication").get("role") == "master"

        wait_until(promoted, timeout_s, f"failover of {HOST}:{dead.port}")
        return self.master()

    def _reported_ports(self) -> set[int]:
        ports: set[int] = set()
        for sentinel in self.sentinels:
            reply = ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", PRIMARY_NAME)
            if reply:
                ports.add(int(reply[1]))
        return ports

    def _ok(self) -> bool:
        try:
            primary = self.master()
        except LookupError:
            return False
        if _info(primary, "replication").get("role") != "master":
            return False
        running_replicas = [n for n in self.data_nodes if n is not primary and n.running]
        if not all(_replica_synced(n) for n in running_replicas):
            return False
        return all(
            self._sentinel_sees(s, len(running_replicas)) for s in self._running(self.sentinels)
        )

    def _sentinel_sees(self, sentinel: EmbeddedRedis, replicas: int) -> bool:
        reply = ask(sentinel, "SENTINEL", "MASTER", PRIMARY_NAME)
        if not reply:
            return False
        fields = (
            dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(reply, list) else reply
        )
        return (
            int(fields.get("num-slaves", 0)) >= replicas
            and int(fields.get("num-other-sentinels", 0)) >= len(self.sentinels) - 1
            and "s_down" not in str(fields.get("flags", ""))
        )

    @staticmethod
    def _running(nodes: Iterable[EmbeddedRedis]) -> list[EmbeddedRedis]:
        return [n for n in nodes if n.running]
