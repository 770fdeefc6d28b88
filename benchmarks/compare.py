"""Before and after, in one run: the hot paths of two versions of seckill side by side.

    .venv/bin/python benchmarks/compare.py                    # baseline: origin of this session
    .venv/bin/python benchmarks/compare.py --baseline REF --seconds 8 --repeat 3

Each version runs as its own `seckill serve` (the baseline from a temporary git worktree of
REF, on the same interpreter and packages) against its own private redis-server. Rounds are
interleaved — bare handler, then each version's sold-out and purchase paths — so a slow spell
of this machine hits all of them; each figure's ratio to the bare handler is taken within its
round, and the median over rounds is reported. The question it answers: did a change make the
storm's two paths slower per request?
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import _machine, _post, _wait_http, process, wrk  # noqa: E402
from seckill import settings as settings_module  # noqa: E402
from seckill.auth import UserAuth  # noqa: E402
from seckill.embedded import EmbeddedRedis, free_port  # noqa: E402

DEFAULT_BASELINE = "c92f7c9"  # main before the fault and edge work (issues 15 and 16)


def _tree(ref: str, work: Path) -> Path:
    target = work / f"tree-{ref}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(target), ref],
        check=True,
    )
    return target


def _activities(base: str, admin: str) -> None:
    now = datetime.now(tz=UTC)
    window = {
        "starts_at": now.replace(year=now.year - 1).isoformat(),
        "ends_at": now.replace(year=now.year + 1).isoformat(),
    }
    for activity_id, quantity in (("buy", 10_000_000), ("gone", 0)):
        _post(f"{base}/admin/v1/activities", {
            "id": activity_id, "sku_id": "sku", "title": "bench", "price_cents": 100,
            "stock": quantity, "per_user_limit": 1000, "payment_timeout_s": 900, **window,
        }, admin)  # fmt: skip


def gateway(
    stack: contextlib.ExitStack, work: Path, tree: Path, label: str, admin: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`seckill serve` from ``tree`` on a private redis-server, with the activities "buy"
    (stock for the whole run) and "gone" (sold out) defined: its process and base URL."""
    redis = EmbeddedRedis(work / f"redis-{label}", appendfsync="everysec")
    redis.start()
    stack.callback(redis.stop)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(
        PYTHONPATH=str(tree),
        SECKILL_DEV="1",
        SECKILL_REDIS_URL=redis.url,
        SECKILL_DATABASE_URL=f"sqlite:///{work / f'{label}.db'}",
    )
    command = [sys.executable, "-m", "seckill", "--log-level", "WARNING", "serve",
               "--port", str(port)]  # fmt: skip
    child = stack.enter_context(process(command, env, tree))
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/healthz")
    _activities(base, admin)
    return child, base


def run(
    baseline: str, seconds: float, repeat: int, connections: int, after: str | None = None
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="seckill-compare-"))
    settings = settings_module.load(environ={})
    tokens = work / "tokens.txt"
    auth = UserAuth(settings.jwt.secret)
    tokens.write_text("".join(f"Bearer {auth.mint(f'b{i}', 7200)}\n" for i in range(20_000)))
    trees = {"before": _tree(baseline, work), "after": _tree(after, work) if after else ROOT}
    samples: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    try:
        with contextlib.ExitStack() as stack:
            bare_port = free_port()
            stack.enter_context(
                process([sys.executable, str(ROOT / "benchmarks" / "bare.py"), str(bare_port)],
                        {**os.environ}, work)
            )  # fmt: skip
            bare = f"http://127.0.0.1:{bare_port}"
            gateways: dict[str, str] = {}
            for label, tree in trees.items():
                _, gateways[label] = gateway(stack, work, tree, label, settings.admin.token)
            _wait_http(bare)
            buy, gone = "/api/v1/activities/buy/orders", "/api/v1/activities/gone/orders"
            for base in gateways.values():
                wrk("warm-up", base, gone, connections, 3, tokens)
            for _ in range(repeat):
                floor = wrk("bare", bare, buy, connections, seconds, tokens).requests_per_s
                samples.setdefault("bare", []).append(floor)
                for label, base in gateways.items():
                    for path_name, path in (("sold-out", gone), ("purchase", buy)):
                        name = f"{path_name} {label}"
                        rps = wrk(name, base, path, connections, seconds, tokens).requests_per_s
                        samples.setdefault(name, []).append(rps)
                        ratios.setdefault(name, []).append(rps / floor)
    finally:
        for tree in trees.values():
            if tree != ROOT:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return {
        "machine": _machine(),
        "baseline": baseline,
        "after": after or "working tree",
        "connections": connections,
        "seconds": seconds,
        "rounds": repeat,
        "req_per_s": {k: [round(v) for v in vs] for k, vs in samples.items()},
        "ratio_to_bare": {k: round(median(vs), 3) for k, vs in ratios.items()},
        "after_vs_before": {
            path: round(median(ratios[f"{path} after"]) / median(ratios[f"{path} before"]), 3)
            for path in ("sold-out", "purchase")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git ref of 'before'")
    parser.add_argument("--after", default=None, help="git ref of 'after' (default: this tree)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    result = run(args.baseline, args.seconds, args.repeat, args.connections, args.after)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S")
    (args.out / f"compare-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
