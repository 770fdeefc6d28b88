"""The cost of a fair sale on the purchase path: the registration and turn check, same run.

    .venv/bin/python benchmarks/fair.py                          # 3 interleaved rounds of 10 s
    .venv/bin/python benchmarks/fair.py --seconds 1 --repeat 1 --users 3000   # a smoke run

One `seckill serve` process and wrk on this machine, every request a fresh user (so every
purchase is a first one) and a fresh Idempotency-Key. Per round, interleaved:

- purchase, fcfs: an activity without registration (the path as it was);
- purchase, lottery: registration + a drawn order where every user is admitted (stock covers
  them all), so each request runs the whole turn check and the purchase;
- sold out, fcfs / sold out, lottery: activities with no stock, answered from memory.

Each round uses users of its own, all registered for the lottery before it starts. Results go
to benchmarks/results/fair-<time>.json; the ratios are lottery / fcfs (1.0 = no cost).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import redis as redis_py  # noqa: E402
import run as harness  # noqa: E402

from seckill import keys  # noqa: E402
from seckill import settings as settings_module  # noqa: E402
from seckill.auth import UserAuth  # noqa: E402
from seckill.embedded import EmbeddedRedis, free_port  # noqa: E402
from seckill.scripts import Scripts  # noqa: E402

PATHS = {
    "purchase, fcfs": "/api/v1/activities/plain/orders",
    "purchase, lottery": "/api/v1/activities/lottery/orders",
    "sold out, fcfs": "/api/v1/activities/plain-gone/orders",
    "sold out, lottery": "/api/v1/activities/lottery-gone/orders",
}


def _at(delta_s: float) -> str:
    return (datetime.now(tz=UTC) + timedelta(seconds=delta_s)).isoformat()


def _definition(activity_id: str, stock: int, lottery: bool, starts_in_s: float) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": activity_id, "sku_id": "sku", "title": "bench", "price_cents": 100,
        "stock": stock, "per_user_limit": 1, "payment_timeout_s": 900,
        "starts_at": _at(starts_in_s), "ends_at": _at(86_400),
    }  # fmt: skip
    if lottery:
        body |= {
            "registration_opens_at": _at(-3600),
            "admission": "lottery",
            "claim_window_s": 86_400,
        }
    return body


def _get(url: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def _register(redis_url: str, activity_id: str, users: list[str]) -> None:
    """Register every user with register.lua, pipelined (what POST .../registration runs)."""
    script = Scripts.from_dir().register
    client = redis_py.Redis.from_url(redis_url)
    client.script_load(script.source)
    script_keys = keys.register_keys(activity_id)
    for start in range(0, len(users), 2000):
        pipe = client.pipeline(transaction=False)
        for user in users[start : start + 2000]:
            pipe.evalsha(script.sha, len(script_keys), *script_keys, user, "")
        pipe.execute()
    client.close()


def measure(seconds: float, repeat: int, users: int) -> dict[str, Any]:
    """Requests/s of each path, median of ``repeat`` interleaved rounds."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed"}
    work = Path(tempfile.mkdtemp(prefix="seckill-bench-fair-"))
    settings = settings_module.load(environ={})
    auth = UserAuth(settings.jwt.secret)
    admin = settings.admin.token
    rounds = [[f"r{r}-u{i}" for i in range(users)] for r in range(repeat)]
    token_files = []
    for r, names in enumerate([["warm-" + str(i) for i in range(2000)], *rounds]):
        path = work / f"tokens-{r}.txt"
        path.write_text("".join(f"Bearer {auth.mint(u, 7200)}\n" for u in names))
        token_files.append(path)
    redis = EmbeddedRedis(work / "redis", appendfsync="everysec")
    redis.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(
        SECKILL_REDIS_URL=redis.url,
        SECKILL_DATABASE_URL=f"sqlite:///{work / 'orders.db'}",
        SECKILL_DEV="1",  # the published secrets: a benchmark on one machine
    )
    samples: dict[str, list[float]] = {name: [] for name in PATHS}
    non_2xx: dict[str, list[int]] = {name: [] for name in PATHS}
    try:
        with harness.process(harness._gateway(port), env, work):
            harness._wait_http(f"{base}/healthz")
            create = f"{base}/admin/v1/activities"
            harness._post(create, _definition("plain", 10_000_000, False, -3600), admin)
            harness._post(create, _definition("plain-gone", 0, False, -3600), admin)
            harness._post(create, _definition("lottery-gone", 0, True, 3600), admin)
            harness._post(create, _definition("lottery", 10_000_000, True, 3600), admin)
            _register(redis.url, "lottery", [u for names in rounds for u in names])
            # replaced before its start (registrations and seed kept): it starts in 2 s
            harness._post(create, _definition("lottery", 10_000_000, True, 2), admin)
            harness._post(create, _definition("lottery-gone", 0, True, 2), admin)
            time.sleep(2.5)
            first_user = auth.mint(rounds[0][0], 600)
            deadline = time.monotonic() + 120
            while _get(f"{base}/api/v1/activities/lottery/queue", first_user)["turn"] in (
                "undrawn",
                "upcoming",
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the draw was not installed within 120 s")
                time.sleep(0.6)
            # warm-up: the token cache and every activity's cache, as a live sale would have
            for name, path in PATHS.items():
                harness.wrk(f"warm-up {name}", base, path, 64, 2, token_files[0])
            for r in range(repeat):
                for name, path in PATHS.items():
                    result = harness.wrk(name, base, path, 64, seconds, token_files[r + 1])
                    samples[name].append(result.requests_per_s)
                    non_2xx[name].append(result.non_2xx)
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    median = {name: sorted(runs)[len(runs) // 2] for name, runs in samples.items()}

    def ratio(a: str, b: str) -> float | None:
        return round(median[a] / median[b], 3) if median[b] else None

    return {
        "req_per_s": median,
        "samples": samples,
        "non_2xx": non_2xx,
        "purchase_ratio": ratio("purchase, lottery", "purchase, fcfs"),
        "sold_out_ratio": ratio("sold out, lottery", "sold out, fcfs"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--users", type=int, default=60_000, help="fresh users per round (more than requests)"
    )
    args = parser.parse_args()
    report = {
        "at": datetime.now(tz=UTC).isoformat(),
        "machine": harness._machine(),
        "fair": measure(args.seconds, args.repeat, args.users),
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S")
    with contextlib.suppress(OSError):
        (out / f"fair-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
