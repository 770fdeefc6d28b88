"""Data keys at start: a development key for `seckill up`, and the checks that stop a process.

`serve` and `writer` (and `up`) refuse to start without a key while an activity requires
addresses, and with a key that is not the one that encrypted under its id before: each key id
leaves a probe encrypted under it in Redis the first time it is used, and a later start whose
key does not open that probe has the wrong key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import redis

from seckill import connections, keys, personal
from seckill.settings import Settings

log = logging.getLogger(__name__)


def with_dev_keys(settings: Settings, loopback: bool) -> Settings:
    """Without data keys on a loopback host: a development key kept under var/ (`up` only)."""
    if settings.data.keys.strip() or not loopback:
        return settings
    keys_text = personal.dev_keys(settings.server.var_dir, settings.data.cipher)
    log.warning(
        "SECKILL_DATA_KEYS unset: personal data is encrypted with a development key kept in %s",
        Path(settings.server.var_dir) / "data.keys",
    )
    return settings.replace("data", keys=keys_text)


def startup_problem(settings: Settings) -> str | None:
    """Why this process must not start with its data keys (one line), or None."""
    import asyncio

    return asyncio.run(_problem(settings))


async def _problem(settings: Settings) -> str | None:
    client = connections.connect(settings.redis)
    try:
        data = settings.data
        if not data.keys.strip():
            return await _needs_a_key(client)
        sealer = personal.Sealer(data.keys, data.cipher, data.hash_key)
        probes: Any = await client.hgetall(keys.DATA_KEY_CHECKS)
        new, wrong = personal.check_probes(sealer, probes)
        if wrong:
            return (
                f"SECKILL_DATA_KEYS: key {wrong[0]!r} is not the key that encrypted under that id"
                " before (wrong key): orders sealed with it could not be read"
            )
        for kid, probe in new.items():
            await client.hsetnx(keys.DATA_KEY_CHECKS, kid, probe)
        return None
    except redis.RedisError as exc:
        # unreachable Redis is not a key problem: the gateway starts and says 503 until it is back
        log.warning("could not check data keys against Redis: %s", exc)
        return None
    finally:
        await connections.close(client)


async def _needs_a_key(client: connections.Client) -> str | None:
    members: Any = await client.smembers(keys.ACTIVITIES)
    for member in sorted(members):
        activity_id = member.decode()
        if await client.hget(keys.meta(activity_id), "requires_address") == b"1":
            return (
                f"activity {activity_id!r} requires addresses but no data key is set:"
                " set SECKILL_DATA_KEYS=kid:base64key (`seckill keys new KID` makes one)"
            )
    return None
