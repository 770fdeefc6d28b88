"""Measure seckill's hot paths against a bare aiohttp handler, in one run, on this machine.

    .venv/bin/python benchmarks/run.py                 # the full run (several minutes)
    .venv/bin/python benchmarks/run.py --quick         # a smoke of the harness (seconds)

Everything runs on loopback: a private redis-server, the bare handler (the web layer's ceiling),
and `seckill serve`. The load generator is wrk with a Lua script that gives every request its
own user token and Idempotency-Key; its CPU share is recorded for every run, so a saturated
generator would show. Results go to benchmarks/results/ as JSON and a markdown table, every
figure with its ratio to the bare handler measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seckill import settings as settings_module  # noqa: E402
from seckill.auth import UserAuth  # noqa: E402
from seckill.embedded import EmbeddedRedis, free_port  # noqa: E402

WRK_SCRIPT = ROOT / "benchmarks" / "wrk" / "order.lua"


@dataclass
class Result:
    name: str
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    wrk_cpu_share: float  # wrk's CPU time / wall time: near 1.0 means the generator saturated
    ratio_to_bare: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def _machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version,
        "wrk": (wrk_version.stdout or wrk_version.stderr).split("\n")[0],
    }


def _wait_http(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _post(url: str, body: dict[str, Any], token: str) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201, response.status


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    number, unit = match.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(name: str, base: str, path: str, connections: int, seconds: float, tokens: Path) -> Result:
    """One wrk run; parses its summary and samples its CPU share."""
    env = {**os.environ, "SECKILL_TOKENS": str(tokens), "SECKILL_PATH": path}
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(WRK_SCRIPT),
        base,
    ]
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    cpu = 0.0
    while process.poll() is None:
        with contextlib.suppress(OSError, IndexError):
            cpu = _cpu_seconds(process.pid)
        time.sleep(0.2)
    wall = time.monotonic() - started
    out = process.stdout.read() if process.stdout else ""
    if "Requests/sec" not in out or "50%" not in out:
        raise RuntimeError(f"wrk run {name!r} printed no summary:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _latency_ms(re.search(r"^\s+50%\s+(\S+)$", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _latency_ms(re.search(r"^\s+99%\s+(\S+)$", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Result(
        name=name,
        connections=connections,
        requests_per_s=rps,
        p50_ms=p50,
        p99_ms=p99,
        requests=total,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        wrk_cpu_share=round(cpu / wall, 2) if wall else 0.0,
    )


@contextlib.contextmanager
def process(
    command: list[str], env: dict[str, str], cwd: Path
) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()


def _median(runs: list[Result]) -> Result:
    """The run with the median throughput, with every run's figures kept in its notes."""
    ordered = sorted(runs, key=lambda r: r.requests_per_s)
    middle = ordered[len(ordered) // 2]
    middle.notes["samples_req_per_s"] = [round(r.requests_per_s) for r in runs]
    middle.notes["samples_p99_ms"] = [r.p99_ms for r in runs]
    return middle


def run(seconds: float, connection_counts: list[int], quick: bool, repeat: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks need wrk (Debian: apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="seckill-bench-"))
    settings = settings_module.load(environ={})
    auth = UserAuth(settings.jwt.secret)
    tokens = work / "tokens.txt"
    # minted ahead of time: signing is not what is measured
    tokens.write_text("".join(f"Bearer {auth.mint(f'b{i}', 7200)}\n" for i in range(20_000)))
    admin = settings.admin.token
    redis = EmbeddedRedis(work / "redis", appendfsync="everysec")
    redis.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env["SECKILL_REDIS_URL"] = redis.url
    env["SECKILL_DATABASE_URL"] = f"sqlite:///{work / 'orders.db'}"
    results: list[Result] = []
    try:
        bare_port, gateway_port = free_port(), free_port()
        bare = [sys.executable, str(ROOT / "benchmarks" / "bare.py"), str(bare_port)]
        gateway = [
            sys.executable,
            "-m",
            "seckill",
            "--log-level",
            "WARNING",
            "serve",
            "--port",
            str(gateway_port),
            "--workers",
            "1",
        ]
        with process(bare, env, work), process(gateway, env, work):
            bare_url = f"http://127.0.0.1:{bare_port}"
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            _wait_http(f"{bare_url}/")
            _wait_http(f"{gateway_url}/healthz")
            now = datetime.now(tz=UTC)
            window = {
                "starts_at": (now.replace(year=now.year - 1)).isoformat(),
                "ends_at": (now.replace(year=now.year + 1)).isoformat(),
            }
            for activity_id, stock, limit in (("buy", 10_000_000, 1000), ("gone", 0, 1)):
                _post(
                    f"{gateway_url}/admin/v1/activities",
                    {
                        "id": activity_id,
                        "sku_id": "sku",
                        "title": "bench",
                        "price_cents": 100,
                        "stock": stock,
                        "per_user_limit": limit,
                        "payment_timeout_s": 900,
                        **window,
                    },
                    admin,
                )
            # warm the gateway's token cache and the sold-out mark as a live sale would have
            wrk(
                "warm-up",
                gateway_url,
                "/api/v1/activities/gone/orders",
                64,
                2 if quick else 5,
                tokens,
            )
            scenarios = [
                (name, base, path, connections)
                for connections in connection_counts
                for name, base, path in (
                    ("bare aiohttp+uvloop handler", bare_url, "/api/v1/activities/buy/orders"),
                    ("sold-out fast path", gateway_url, "/api/v1/activities/gone/orders"),
                    ("purchase (reserve_stock.lua)", gateway_url, "/api/v1/activities/buy/orders"),
                )
            ]
            import redis as redis_client

            control = redis_client.Redis(port=redis.port)
            policies = ("always", "everysec")
            samples: dict[tuple[str, int], list[Result]] = {}
            # interleaved rounds: a slow spell of the machine hits every path, not just one
            for _ in range(repeat):
                for name, base, path, connections in scenarios:
                    result = wrk(name, base, path, connections, seconds, tokens)
                    samples.setdefault((name, connections), []).append(result)
                for policy in policies:
                    # durability: the same purchase path, every write fsynced before the reply
                    control.config_set("appendfsync", policy)
                    name = f"purchase, appendfsync {policy}"
                    result = wrk(
                        name, gateway_url, "/api/v1/activities/buy/orders", 64, seconds, tokens
                    )
                    samples.setdefault((name, 64), []).append(result)
                control.config_set("appendfsync", "everysec")
            control.close()
            results = []
            for (_name, connections), runs in samples.items():
                bare_runs = samples[("bare aiohttp+uvloop handler", connections)]
                # ratio within each round (same machine conditions), then the median of those
                ratios = sorted(
                    r.requests_per_s / b.requests_per_s
                    for r, b in zip(runs, bare_runs, strict=True)
                )
                result = _median(runs)
                result.ratio_to_bare = round(ratios[len(ratios) // 2], 3)
                result.notes["ratios_per_round"] = [round(x, 3) for x in ratios]
                results.append(result)
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "when": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "seconds_per_run": seconds,
        "repeats": repeat,
        "results": [asdict(r) for r in results],
    }


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# seckill benchmarks, {report['when']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, "
        f"Linux {machine['kernel']}, Python {machine['python']}, Redis {machine['redis']}, "
        f"{machine['wrk']}. One gateway process; wrk -t1, {report['seconds_per_run']} s per run, "
        f"median of {report['repeats']} interleaved rounds (all samples in the JSON).",
        "",
        "Ratio to bare: the ratio within each round, median over the rounds.",
        "",
        "| path | connections | req/s | ratio to bare | p50 ms | p99 ms | non-2xx | wrk CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r['connections']} | {r['requests_per_s']:,.0f} | "
            f"{r['ratio_to_bare']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['non_2xx']:,} | {r['wrk_cpu_share']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each wrk run")
    parser.add_argument("--quick", action="store_true", help="a smoke of the harness")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    connections = [64] if args.quick else [64, 256]
    report = run(seconds, connections, args.quick, 1 if args.quick else args.repeat)
    table = markdown(report)
    print(table)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = report["when"][:19].replace(":", "").replace("-", "")
        (args.out / f"{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{stamp}.md").write_text(table)
        (args.out / "latest.md").write_text(table)
    else:
        json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
