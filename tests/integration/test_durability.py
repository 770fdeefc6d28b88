"""durability = "replicated": a 202 only once a replica holds the order, on a real primary
and replica (`replicaof`), and 503 with a retry-safe replay when no replica confirms."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from seckill import keys
from seckill.embedded import EmbeddedRedis, free_port
from seckill.errors import NotReplicated
from seckill.scripts import Coalescer, Scripts
from seckill.settings import Settings
from seckill.stock import Outcome, Stock
from seckill.web.app import create_app
from tests.helpers import activity_body, admin_headers, user_headers
from tests.orders.test_writer import _activity as _local_activity

Client = TestClient[Any, Any]


class Replica:
    """A redis-server replicating a primary (``replicaof``), killed and started at will."""

    def __init__(self, data_dir: Path, primary_port: int) -> None:
        self.data_dir = data_dir
        self.primary_port = primary_port
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                binary,
                *("--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir)),
                *("--replicaof", "127.0.0.1", str(self.primary_port)),
                *("--save", "", "--appendonly", "no", "--logfile", "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
        )
        _wait(lambda: self.info().get("master_link_status") == "up", "the replica to sync")

    def pause(self) -> None:
        """SIGSTOP: connected as far as the primary knows, yet acknowledging nothing (a replica
        lagging behind)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9: the primary sees the link drop at once."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a stopped process dies of SIGKILL all the same
            process.send_signal(signal.SIGKILL)
            process.wait()

    def info(self) -> dict[str, Any]:
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return dict(client.info("replication"))
        except redis.ConnectionError:
            return {}
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def _wait(condition: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _replicas(primary: EmbeddedRedis) -> int:
    client = redis.Redis.from_url(primary.url)
    try:
        return int(client.info("replication")["connected_slaves"])
    finally:
        client.close()


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "primary", appendfsync="no")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def replica(primary: EmbeddedRedis, tmp_path: Path) -> Iterator[Replica]:
    server = Replica(tmp_path / "replica", primary.port)
    server.start()
    yield server
    server.kill()


def _replicated(settings: Settings, primary: EmbeddedRedis) -> Settings:
    """durability "replicated" with a WAIT long enough for a busy test machine's replica."""
    return settings.replace(
        "redis", url=primary.url, durability="replicated", replica_wait_ms=2000, socket_timeout_s=5
    )


@pytest.fixture
async def gateway(settings: Settings, primary: EmbeddedRedis) -> AsyncIterator[Client]:
    settings = _replicated(settings, primary)
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def _activity(client: Client, settings: Settings) -> str:
    body = activity_body(stock=100, per_user_limit=1)
    response = await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert response.status == 201, await response.text()
    return str(body["id"])


async def _buy(client: Client, settings: Settings, activity_id: str, user: str) -> Any:
    return await client.post(
        f"/api/v1/activities/{activity_id}/orders",
        json={"quantity": 1},
        headers=user_headers(settings, user, f"key-{user}"),
    )


async def _until(condition: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_202_is_given_only_once_a_replica_holds_the_order(
    gateway: Client, settings: Settings, replica: Replica
) -> None:
    """Invariant: every 202 under "replicated" is on a replica when it is answered; with the
    replica gone purchases answer 503, and the retry replays the same order once it is back."""
    activity_id = await _activity(gateway, settings)
    accepted = await asyncio.gather(
        *(_buy(gateway, settings, activity_id, f"u{n}") for n in range(20))
    )
    assert [r.status for r in accepted] == [202] * 20
    copy = replica.client()
    orders = keys.orders(activity_id)
    for response in accepted:
        # read at once, not waited for: WAIT returned only after the replica acknowledged
        assert copy.hexists(orders, (await response.json())["order_id"])
    assert (await gateway.get("/readyz")).status == 200

    replica.kill()
    refused = await _buy(gateway, settings, activity_id, "late")
    assert refused.status == 503 and "Retry-After" in refused.headers
    assert (await refused.json())["error"]["code"] == "overloaded"
    # a "ready" is kept a second: wait for the next probe
    await _until(lambda: _not_ready(gateway), "/readyz to see the replica gone")
    ready = await gateway.get("/readyz")
    assert "no replica" in (await ready.json())["error"]["message"]

    replica.start()
    await _until(lambda: _ready(gateway), "/readyz once the replica is back")
    again = await _buy(gateway, settings, activity_id, "late")
    assert again.status == 202 and again.headers.get("Idempotent-Replayed") == "true"
    order_id = (await again.json())["order_id"]
    assert replica.client().hexists(orders, order_id), "the replayed order is on the replica"
    copy.close()


async def _ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 200


async def _not_ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 503


async def test_without_any_replica_purchases_answer_503_and_readyz_says_why(
    gateway: Client, settings: Settings, primary: EmbeddedRedis
) -> None:
    """Invariant: "replicated" never answers 202 from a lone primary."""
    assert _replicas(primary) == 0
    body = activity_body(stock=5)
    created = await gateway.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    assert created.status == 503, "creating an activity waits for a replica too"
    flag = await gateway.put(
        "/admin/v1/flags/reviews.enabled", json={"value": False}, headers=admin_headers(settings)
    )
    assert flag.status == 503, "so does a flag change"
    # the activity as a "local" gateway would have created it: only the purchase can refuse
    client = Redis.from_url(primary.url)
    local = Stock(client, Scripts.from_dir(), Coalescer(client, max_batch=8, in_flight=1), 90_000)
    await _local_activity(local, "alone", 5)
    await client.aclose()
    response = await _buy(gateway, settings, "alone", "buyer")
    assert response.status == 503
    assert "replicat" in (await response.json())["error"]["message"]
    ready = await gateway.get("/readyz")
    assert ready.status == 503
    assert "durability = replicated" in (await ready.json())["error"]["message"]


async def test_a_replay_on_another_connection_waits_for_the_replica_too(
    replica: Replica, primary: EmbeddedRedis
) -> None:
    """Invariant: a replayed 202 names an order a replica holds, even when the retry goes out
    on a connection that never wrote it: two clients of their own, with no background loop
    writing on their connections. (On Redis 7.0 a script call makes its WAIT cover the primary's
    offset at the call, writes or not, as observed; this test says so if a version does not.)"""
    first, other = Redis.from_url(primary.url), Redis.from_url(primary.url)
    scripts = Scripts.from_dir()
    buy, retry = (
        Stock(c, scripts, Coalescer(c, max_batch=8, in_flight=1, replica_wait_ms=2000), 90_000)
        for c in (first, other)
    )
    try:
        await _local_activity(buy, "lag", 10)
        # the other client's connection last wrote this order: acknowledged by the replica
        assert (await retry.reserve("lag", "warm", "k", 1)).outcome is Outcome.OK
        replica.pause()
        try:
            with pytest.raises(NotReplicated):
                await buy.reserve("lag", "lagged", "k", 1)
            with pytest.raises(NotReplicated):
                # WAIT counts from this connection's last write (the warm order, which the
                # replica acknowledged): it must still not answer for an order written since
                await retry.reserve("lag", "lagged", "k", 1)
        finally:
            replica.resume()
        again = await retry.reserve("lag", "lagged", "k", 1)
        assert again.outcome is Outcome.REPLAY
        copy = replica.client()
        assert copy.hexists(keys.orders("lag"), again.order_id)
        copy.close()
    finally:
        await first.aclose()
        await other.aclose()
