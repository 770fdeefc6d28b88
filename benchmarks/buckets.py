"""What splitting a hot item into buckets costs Redis: script calls per storm, no timing.

One storm (400 users, one to three concurrent orders each of one or two units, stock 37, limit
2) against the real gateway app on a redis-server of its own, for: one bucket; four buckets
with the buyers spread evenly; four buckets with nobody homed in the last one (its stock can
only be sold by moving it). Prints the answers, the EVALSHA calls Redis counted
(INFO commandstats) and the units moved between buckets. Counts, not times: it may run
while other work shares the machine.

    python benchmarks/buckets.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import buckets, keys
from seckill import settings as settings_module
from seckill.auth import UserAuth
from seckill.embedded import EmbeddedRedis
from seckill.settings import Settings
from seckill.web.app import create_app

STOCK, LIMIT, USERS = 37, 2, 400
RISK_OFF = Path(__file__).resolve().parent.parent / "tests" / "risk_off.toml"


async def storm(client: TestClient[Any, Any], settings: Settings, count: int, cold: bool) -> str:
    """Define a live activity and buy it out; its id (answers are counted by status)."""
    activity_id = f"b{count}{'c' if cold else ''}{random.randrange(10**9)}"
    admin = {"Authorization": f"Bearer {settings.admin.token}"}
    body = {
        "id": activity_id, "sku_id": "s", "title": "t", "price_cents": 100, "stock": STOCK,
        "per_user_limit": LIMIT, "starts_at": "2000-01-01T00:00:00Z",
        "ends_at": "2099-01-01T00:00:00Z", "payment_timeout_s": 900,
        **({"buckets": count} if count > 1 else {}),
    }  # fmt: skip
    assert (await client.post("/admin/v1/activities", json=body, headers=admin)).status == 201
    users = (f"u{n}" for n in range(100 * USERS))
    last = keys.bucket(activity_id, count - 1)
    chosen = [u for u in users if not cold or buckets.home(activity_id, count, u) != last]
    rng = random.Random(11)
    requests = [
        (user, f"k{n}", rng.choice((1, 1, 2)))
        for user in chosen[:USERS]
        for n in range(rng.choice((1, 1, 2, 3)))
    ]
    auth = UserAuth(settings.jwt.secret)

    async def buy(user: str, key: str, quantity: int) -> int:
        headers = {"Authorization": f"Bearer {auth.mint(user, 600)}", "Idempotency-Key": key}
        while True:
            response = await client.post(
                f"/api/v1/activities/{activity_id}/orders", json={"quantity": quantity},
                headers=headers,
            )  # fmt: skip
            if response.status != 503:  # the stock was moving: retried, as a client would
                return response.status
            await asyncio.sleep(0.05)

    statuses = await asyncio.gather(*(buy(*r) for r in requests))
    print(f"  answers {dict(Counter(statuses))} to {len(requests)} orders", end="")
    return activity_id


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", appendfsync="no")
        server.start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
            settings = settings_module.load(environ=env).replace("redis", url=server.url)
            settings = settings.replace("risk", rules_path=str(RISK_OFF))
            settings = settings.replace("server", var_dir=str(Path(tmp) / "var"))
            sync = redis.Redis.from_url(server.url)
            for _ in range(rounds):
                for count, cold in ((1, False), (4, False), (4, True)):
                    print(f"buckets={count}{' (last bucket cold)' if cold else ''}:", end="")
                    async with TestClient(TestServer(create_app(settings))) as client:
                        sync.config_resetstat()
                        activity_id = await storm(client, settings, count, cold)
                        calls = sync.info("commandstats").get("cmdstat_evalsha", {}).get("calls")
                        moved = sum(
                            int(sync.hget(keys.counters(space), "moved_out") or 0)
                            for space in buckets.spaces(activity_id, count)
                        )
                        print(f", EVALSHA {calls}, units moved {moved}")
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args().rounds))
