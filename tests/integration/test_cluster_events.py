"""Pub/sub events on a Redis Cluster: heard through one node, and again after that node dies."""

from __future__ import annotations

import asyncio
import contextlib

import redis
from redis.exceptions import RedisClusterException

from seckill import connections, keys
from seckill import settings as settings_module
from seckill.embedded import EmbeddedRedis
from seckill.events import Events
from seckill.topology import HOST, Cluster, ask


def _subscribed_node(cluster: Cluster) -> EmbeddedRedis | None:
    """The node holding a connection subscribed to a channel (CLIENT LIST's sub=1)."""
    for node in cluster.nodes:
        if " sub=1 " in (ask(node, "CLIENT", "LIST") or ""):
            return node
    return None


async def _heard(cluster: Cluster, heard: list[str], subject: str) -> bool:
    """Publish until the listener hears ``subject`` (a subscription may be re-made meanwhile)."""
    for _ in range(150):
        publisher = cluster.client()
        with contextlib.suppress(redis.ConnectionError, RedisClusterException):
            publisher.publish(keys.EVENTS_CHANNEL, f"test:{subject}")
        publisher.close()
        await asyncio.sleep(0.2)
        if subject in heard:
            return True
    return False


async def test_events_resubscribe_on_another_node_when_theirs_dies(
    redis_cluster: Cluster,
) -> None:
    settings = settings_module.load(environ={"SECKILL_REDIS_URL": redis_cluster.url})
    client = connections.connect(settings.redis)
    heard: list[str] = []
    resyncs: list[int] = []

    async def resync() -> None:
        resyncs.append(1)

    events = Events(client)
    events.on("test", heard.append, resync)
    listener = asyncio.create_task(events.run())
    try:
        assert await _heard(redis_cluster, heard, "first")
        node = await asyncio.to_thread(_subscribed_node, redis_cluster)
        assert node is not None
        was_master = node in redis_cluster.masters()
        redis_cluster.kill(node)
        if was_master:
            await asyncio.to_thread(redis_cluster.wait_failover, node)
        assert await _heard(redis_cluster, heard, "after")
        assert len(resyncs) >= 2, "state re-read after the new subscription"
        assert await asyncio.to_thread(_subscribed_node, redis_cluster) not in (None, node)
    finally:
        events.close()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await connections.close(client)
        for stopped in [n for n in redis_cluster.nodes if not n.running]:
            redis_cluster.restart(stopped)
        await asyncio.to_thread(redis_cluster.wait_ok)


def test_publish_reaches_a_subscriber_on_any_node(redis_cluster: Cluster) -> None:
    """The premise: a PUBLISH sent to one node is heard on every other (the cluster bus)."""
    nodes = [n for n in redis_cluster.nodes if n.running]
    listener = redis.Redis(host=HOST, port=nodes[-1].port).pubsub()
    listener.subscribe("premise")
    listener.get_message(timeout=1)
    redis.Redis(host=HOST, port=nodes[0].port).publish("premise", "hello")
    message = listener.get_message(timeout=5)
    assert message is not None and message["data"] == b"hello"
    listener.close()
