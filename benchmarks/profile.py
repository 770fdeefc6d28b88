"""Where a gateway process spends its time on the storm's two paths: py-spy under wrk.

    .venv/bin/python benchmarks/profile.py --label after            # this tree
    .venv/bin/python benchmarks/profile.py --label before --ref REF # a git ref, from a worktree

One `seckill serve` (one process, metrics on, the shipped limits and risk rules) against a
private redis-server; wrk at 64 connections drives the sold-out path, then the purchase path,
while py-spy samples the gateway at 250 Hz. For each path it writes, under
benchmarks/profiles/: the collapsed stacks (`<label>-<path>.txt`, the input of any flame graph
tool), a flame graph (`.svg`) and a summary (`<label>.md`): the frames with the most samples of
their own, and the share of the whole under each hot frame.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import _tree, gateway  # noqa: E402
from benchmarks.run import WRK_SCRIPT, wrk  # noqa: E402
from seckill import settings as settings_module  # noqa: E402
from seckill.auth import UserAuth  # noqa: E402

PATHS = {"sold-out": "/api/v1/activities/gone/orders", "purchase": "/api/v1/activities/buy/orders"}


def _spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    return found


def record(pid: int, base: str, path: str, seconds: int, tokens: Path, out: Path) -> None:
    """wrk drives `path` while py-spy records `seconds` of the gateway: raw stacks and SVG."""
    env = {**os.environ, "SECKILL_TOKENS": str(tokens), "SECKILL_PATH": path}
    load = subprocess.Popen(
        ["wrk", "-t1", "-c64", f"-d{seconds + 3}s", "-s", str(WRK_SCRIPT), base],
        env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1)
    for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
        subprocess.run(
            [_spy(), "record", "-p", str(pid), "-d", str(seconds // 2), "-r", "250", "-f", fmt,
             "-o", str(out.with_suffix(suffix)), "--nonblocking"],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
    load.wait(60)


def summary(raw: Path, top: int = 30) -> list[str]:
    """The functions with the most samples of their own, with their inclusive share.

    By function, not by line: a coroutine's samples land on whichever line it was resumed at.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples.", "", "| own % | inclusive % | frame |", "|---:|---:|---|"]
    for frame, n in own.most_common(top):
        share = 100 * n / total
        lines.append(f"| {share:.1f} | {100 * inclusive[frame] / total:.1f} | `{frame}` |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True, help="name of this profile: before, after, ...")
    parser.add_argument("--ref", default=None, help="profile this git ref (default: this tree)")
    parser.add_argument("--seconds", type=int, default=10, help="sampled seconds per path")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "profiles")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="seckill-profile-"))
    settings = settings_module.load(environ={})
    auth = UserAuth(settings.jwt.secret)
    tokens = work / "tokens.txt"
    tokens.write_text("".join(f"Bearer {auth.mint(f'b{i}', 7200)}\n" for i in range(20_000)))
    tree = _tree(args.ref, work) if args.ref else ROOT
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref or "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    where = f"{args.ref} ({commit})" if args.ref else f"the working tree at {commit}"
    report = [f"# py-spy profile: {args.label}, {where}", ""]
    try:
        with contextlib.ExitStack() as stack:
            served, base = gateway(stack, work, tree, args.label, settings.admin.token)
            for name, path in PATHS.items():
                wrk("warm-up", base, path, 64, 3, tokens)
                load = wrk(name, base, path, 64, 5, tokens)
                raw = args.out / f"{args.label}-{name}.txt"
                record(served.pid, base, path, args.seconds * 2, tokens, raw)
                report += [
                    f"## {name} ({path})",
                    "",
                    f"wrk -c64, 5 s, unprofiled: {load.requests_per_s:,.0f} req/s, "
                    f"p99 {load.p99_ms:.1f} ms. Flame graph: `{raw.with_suffix('.svg').name}`.",
                    "",
                    *summary(raw),
                    "",
                ]
    finally:
        if tree != ROOT:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    (args.out / f"{args.label}.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
