"""What durability = "replicated" costs: purchase (and sold-out) throughput of a gateway that
waits for a replica (one WAIT per coalesced batch) against one that does not, both on the same
primary with one replica (`replicaof`), in the same run, interleaved.

    .venv/bin/python benchmarks/durability.py                          # 10 s per run, 3 rounds
    .venv/bin/python benchmarks/durability.py --seconds 1 --repeat 1   # a smoke of the harness

Every purchase writes, so every batch of the replicated gateway waits for the replica's
acknowledgement of its writes (`WAIT 1 <replica_wait_ms>`); the sold-out path is answered from
memory and shows what the setting costs where nothing is written. Results go to
benchmarks/results/durability-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as harness  # noqa: E402

from seckill import settings as settings_module  # noqa: E402
from seckill.auth import UserAuth  # noqa: E402
from seckill.embedded import EmbeddedRedis, free_port  # noqa: E402

SETTINGS = ("local", "replicated")


def measure(seconds: float, repeat: int) -> dict[str, Any]:
    """Req/s of both paths under each durability, interleaved rounds; medians and ratios."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed"}
    work = Path(tempfile.mkdtemp(prefix="seckill-bench-durability-"))
    settings = settings_module.load(environ={})
    auth = UserAuth(settings.jwt.secret)
    tokens = work / "tokens.txt"
    tokens.write_text("".join(f"Bearer {auth.mint(f'b{i}', 7200)}\n" for i in range(20_000)))
    (work / "limits.toml").write_text("[default]\nuser_rate_per_s = 0\n")
    primary = EmbeddedRedis(work / "primary", appendfsync="everysec")
    primary.start()
    replica = EmbeddedRedis(
        work / "replica",
        appendfsync="everysec",
        extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
    )
    replica.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(
        SECKILL_REDIS_URL=primary.url,
        SECKILL_DATABASE_URL=f"sqlite:///{work / 'orders.db'}",
        SECKILL_LIMITS_RULES_PATH=str(work / "limits.toml"),
        SECKILL_DEV="1",  # the published secrets: a benchmark on one machine
    )
    ports = {name: free_port() for name in SETTINGS}
    samples: dict[str, list[float]] = {}
    non_2xx: dict[str, list[int]] = {}
    try:
        with contextlib.ExitStack() as stack:
            for name, port in ports.items():
                stack.enter_context(
                    harness.process(
                        harness._gateway(port), {**env, "SECKILL_REDIS_DURABILITY": name}, work
                    )
                )
                harness._wait_http(f"http://127.0.0.1:{port}/readyz")
            now = datetime.now(tz=UTC)
            for activity_id, stock in (("buy", 10_000_000), ("gone", 0)):
                harness._post(f"http://127.0.0.1:{ports['local']}/admin/v1/activities", {
                    "id": activity_id, "sku_id": "sku", "title": "bench", "price_cents": 100,
                    "stock": stock, "per_user_limit": 1000, "payment_timeout_s": 900,
                    "starts_at": now.replace(year=now.year - 1).isoformat(),
                    "ends_at": now.replace(year=now.year + 1).isoformat(),
                }, settings.admin.token)  # fmt: skip
            paths = {"purchase": "/api/v1/activities/buy/orders",
                     "sold-out": "/api/v1/activities/gone/orders"}  # fmt: skip
            for port in ports.values():  # warm-up: token caches, sold-out marks
                harness.wrk("warm-up", f"http://127.0.0.1:{port}", paths["sold-out"], 64, 2, tokens)
            for _ in range(repeat):
                for path_name, path in paths.items():
                    for name, port in ports.items():
                        label = f"{path_name}, {name}"
                        base = f"http://127.0.0.1:{port}"
                        result = harness.wrk(label, base, path, 64, seconds, tokens)
                        samples.setdefault(label, []).append(result.requests_per_s)
                        non_2xx.setdefault(label, []).append(result.non_2xx)
    finally:
        replica.stop()
        primary.stop()
        shutil.rmtree(work, ignore_errors=True)
    median = {label: sorted(runs)[len(runs) // 2] for label, runs in samples.items()}
    ratios = {
        path_name: round(median[f"{path_name}, replicated"] / median[f"{path_name}, local"], 3)
        for path_name in ("purchase", "sold-out")
        if median.get(f"{path_name}, local")
    }
    return {"req_per_s": median, "samples": samples, "non_2xx": non_2xx,
            "replicated_over_local": ratios}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    report = {
        "at": datetime.now(tz=UTC).isoformat(),
        "machine": harness._machine(),
        **measure(args.seconds, args.repeat),
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S")
    with contextlib.suppress(OSError):
        (out / f"durability-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
