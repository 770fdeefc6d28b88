"""The cost of personal data on the purchase path: sealing an address, per order and end to end.

    .venv/bin/python benchmarks/address.py            # micro figures + purchase with/without
    .venv/bin/python benchmarks/address.py --micro    # only the in-process figures (seconds)

In process: validate + hash + seal (the gateway's work per order) and open + mask (an owner's
GET), in microseconds per order, for SM4-GCM and AES-256-GCM. End to end (needs wrk): one
`seckill serve` process, the same purchase path with and without an address in the body, in
the same run, interleaved; the difference is what encryption (and the bigger record) costs.
Results go to benchmarks/results/address-<time>.json.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as harness  # noqa: E402

from seckill import personal  # noqa: E402
from seckill import settings as settings_module  # noqa: E402
from seckill.auth import UserAuth  # noqa: E402
from seckill.embedded import EmbeddedRedis, free_port  # noqa: E402

ADDRESS = {
    "name": "李雷",
    "phone": "13812341234",
    "region": "北京市海淀区",
    "detail": "中关村大街1号院2号楼3单元401",
}


def _per_order_us(work: Any, rounds: int) -> float:
    started = time.perf_counter()
    for n in range(rounds):
        work(n)
    return round((time.perf_counter() - started) / rounds * 1e6, 2)


def micro(rounds: int) -> dict[str, Any]:
    """Microseconds per order of the gateway's and the owner's work, per cipher."""
    figures: dict[str, Any] = {}
    for cipher in personal.CIPHERS:
        sealer = personal.Sealer(personal.new_key("b1", cipher), cipher)
        address = personal.parse_address(ADDRESS)
        sealed = [sealer.seal(address, f"buy.{n:020x}") for n in range(rounds)]

        def accept(n: int, sealer: personal.Sealer = sealer) -> None:
            parsed = personal.parse_address(ADDRESS)
            sealer.hash(parsed)
            sealer.seal(parsed, f"buy.{n:020x}")

        def reveal(n: int, sealer: personal.Sealer = sealer, sealed: list[str] = sealed) -> None:
            sealer.open(sealed[n], f"buy.{n:020x}").masked()

        figures[cipher] = {
            "validate_hash_seal_us": _per_order_us(accept, rounds),
            "seal_only_us": _per_order_us(
                lambda n, s=sealer, a=address: s.seal(a, f"buy.{n:020x}"), rounds
            ),
            "open_and_mask_us": _per_order_us(reveal, rounds),
            "ciphertext_bytes": len(sealed[0]),
        }
    return figures


def end_to_end(seconds: float, repeat: int) -> dict[str, Any]:
    """Purchase req/s with and without an address, one gateway, interleaved rounds."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed"}
    work = Path(tempfile.mkdtemp(prefix="seckill-bench-address-"))
    settings = settings_module.load(environ={})
    auth = UserAuth(settings.jwt.secret)
    tokens = work / "tokens.txt"
    tokens.write_text("".join(f"Bearer {auth.mint(f'b{i}', 7200)}\n" for i in range(20_000)))
    redis = EmbeddedRedis(work / "redis", appendfsync="everysec")
    redis.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(
        SECKILL_REDIS_URL=redis.url,
        SECKILL_DATABASE_URL=f"sqlite:///{work / 'orders.db'}",
        SECKILL_DATA_KEYS=personal.new_key("bench"),
        SECKILL_DEV="1",  # the published secrets: a benchmark on one machine
    )
    samples: dict[str, list[float]] = {"without address": [], "with address": []}
    non_2xx: dict[str, list[int]] = {"without address": [], "with address": []}
    try:
        with harness.process(harness._gateway(port), env, work):
            harness._wait_http(f"{base}/healthz")
            now = datetime.now(tz=UTC)
            for activity_id in ("plain", "ships"):
                harness._post(f"{base}/admin/v1/activities", {
                    "id": activity_id, "sku_id": "sku", "title": "bench", "price_cents": 100,
                    "stock": 10_000_000, "per_user_limit": 1000, "payment_timeout_s": 900,
                    "starts_at": now.replace(year=now.year - 1).isoformat(),
                    "ends_at": now.replace(year=now.year + 1).isoformat(),
                }, settings.admin.token)  # fmt: skip
            bodies = {
                "without address": ("/api/v1/activities/plain/orders", {"quantity": 1}),
                "with address": (
                    "/api/v1/activities/ships/orders",
                    {"quantity": 1, "address": ADDRESS},
                ),
            }
            # warm-up: the token cache and both activities' caches, as a live sale would have
            for name, (path, body) in bodies.items():
                os.environ["SECKILL_BODY"] = json.dumps(body, ensure_ascii=False)
                harness.wrk(f"warm-up {name}", base, path, 64, 2, tokens)
            for _ in range(repeat):
                for name, (path, body) in bodies.items():
                    os.environ["SECKILL_BODY"] = json.dumps(body, ensure_ascii=False)
                    result = harness.wrk(name, base, path, 64, seconds, tokens)
                    samples[name].append(result.requests_per_s)
                    non_2xx[name].append(result.non_2xx)
    finally:
        os.environ.pop("SECKILL_BODY", None)
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    median = {name: sorted(runs)[len(runs) // 2] for name, runs in samples.items()}
    plain, sealed = median["without address"], median["with address"]
    return {
        "req_per_s": median,
        "samples": samples,
        "non_2xx": non_2xx,
        "cost_per_order_us": round((1 / sealed - 1 / plain) * 1e6, 1) if plain and sealed else None,
        "ratio": round(sealed / plain, 3) if plain else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro", action="store_true", help="in-process figures only")
    parser.add_argument("--rounds", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    report: dict[str, Any] = {"at": datetime.now(tz=UTC).isoformat(), "micro": micro(args.rounds)}
    if not args.micro:
        report["purchase"] = end_to_end(args.seconds, args.repeat)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S")
    with contextlib.suppress(OSError):
        (out / f"address-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
