"""Redis's eviction policy, checked at start: seckill's keys must never be evicted.

An evicting Redis (``allkeys-lru`` and the like) would drop idempotency keys, payment answers or
order records silently under memory pressure: a retried purchase would buy twice, a replayed
callback pay twice. So seckill runs only on ``noeviction``, where a full Redis refuses writes
(the purchase path then answers 503) and loses nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from seckill import connections
from seckill.scripts import CONNECTION_ERRORS
from seckill.settings import Settings

log = logging.getLogger(__name__)

REQUIRED = "noeviction"


async def policy_refusal(settings: Settings) -> str | None:
    """One line saying why this Redis must not be used, or None (unreachable is no refusal)."""
    client = connections.connect(settings.redis)
    try:
        policies = await _policies(client)
    except (*CONNECTION_ERRORS, redis_errors.RedisError) as exc:  # type: ignore[misc]
        log.warning("could not read Redis's maxmemory-policy at start (%r); not checked", exc)
        return None
    finally:
        await connections.close(client)
    wrong = {where: policy for where, policy in policies.items() if policy != REQUIRED}
    if not wrong:
        return None
    where, policy = sorted(wrong.items())[0]
    return (
        f"Redis maxmemory-policy is {policy!r}{where}: seckill needs {REQUIRED!r} (an evicting "
        f"Redis drops idempotency keys and payment answers); run CONFIG SET maxmemory-policy "
        f"{REQUIRED}"
    )


async def _policies(client: connections.Client) -> dict[str, str]:
    """Each master's policy, by " on <node>" (empty for a single Redis or Sentinel primary)."""
    # INFO rather than CONFIG GET: managed Redis services often rename or forbid CONFIG
    if isinstance(client, RedisCluster):
        replies: Any = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        return {f" on {node}": _policy(info) for node, info in replies.items()}
    return {"": _policy(await client.info("memory"))}


def _policy(info: Any) -> str:
    return str(info.get("maxmemory_policy", REQUIRED))


def check(settings: Settings) -> str | None:
    """policy_refusal() for the synchronous CLI."""
    import asyncio

    return asyncio.run(policy_refusal(settings))
