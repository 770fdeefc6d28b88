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

from seckill.scripts import CONNECTION_ERRORS
from seckill.settings import Settings

log = logging.getLogger(__name__)

REQUIRED = "noeviction"


async def policy_refusal(settings: Settings) -> str | None:
    """One line saying why this Redis must not be used, or None (unreachable is no refusal)."""
    from seckill.web.app import redis_client

    client = redis_client(settings)
    try:
        # INFO rather than CONFIG GET: managed Redis services often rename or forbid CONFIG
        info: Any = await client.info("memory")
    except (*CONNECTION_ERRORS, redis_errors.RedisError) as exc:  # type: ignore[misc]
        log.warning("could not read Redis's maxmemory-policy at start (%r); not checked", exc)
        return None
    finally:
        await client.aclose()
    policy = str(info.get("maxmemory_policy", REQUIRED))
    if policy == REQUIRED:
        return None
    return (
        f"Redis maxmemory-policy is {policy!r}: seckill needs {REQUIRED!r} (an evicting Redis "
        f"drops idempotency keys and payment answers); run CONFIG SET maxmemory-policy {REQUIRED}"
    )


def check(settings: Settings) -> str | None:
    """policy_refusal() for the synchronous CLI."""
    import asyncio

    return asyncio.run(policy_refusal(settings))
