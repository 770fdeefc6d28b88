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

from seckill import resources  # noqa: E402
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


def _gateway(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "seckill", "--log-level", "WARNING", "serve", "--port",
            str(port), *extra]  # fmt: skip


def _postgres_database(name: str, create: bool) -> str:
    import asyncio

    import asyncpg

    admin_url = os.environ.get(
        "SECKILL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )

    async def execute() -> None:
        connection = await asyncpg.connect(admin_url)
        try:
            if create:
                await connection.execute(f'CREATE DATABASE "{name}"')
            else:
                await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    asyncio.run(execute())
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _redis_benchmark(port: int, sha: str, seconds: float) -> dict[str, Any]:
    """redis-benchmark EVALSHA-ing reserve_stock.lua directly: the Redis ceiling."""
    from seckill import keys

    activity = "buy"
    script_keys = keys.reserve_keys(activity, "rb__rand_int__", "k__rand_int__", "-")
    args = ["rb__rand_int__", "1", "q=1", f"{activity}.__rand_int__", "90000", "",
            "0", "0", "0", "0", "enforce", "0", "0"]  # fmt: skip
    requests = max(20_000, int(seconds * 60_000))
    done = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-c", "64", "-n", str(requests), "-r", "100000000",
         "-q", "EVALSHA", sha, str(len(script_keys)), *script_keys, *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    match = re.search(r"([\d.]+) requests per second", done.stdout)
    p50 = re.search(r"p50=([\d.]+) msec", done.stdout)
    return {
        "requests_per_s": float(match.group(1)) if match else 0.0,
        "p50_ms": float(p50.group(1)) if p50 else 0.0,
        "requests": requests,
    }


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
    limits = work / "limits.toml"
    # the shipped defaults (5 attempts/s per user) plus an activity held to 1 admission/s
    limits.write_text(
        resources.limits_path().read_text()
        + "\n[activity.limited]\nadmission_rate_per_s = 1\nadmission_burst = 1\n"
    )
    redis = EmbeddedRedis(work / "redis", appendfsync="everysec")
    redis.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(
        SECKILL_REDIS_URL=redis.url,
        SECKILL_DATABASE_URL=f"sqlite:///{work / 'orders.db'}",
        SECKILL_LIMITS_RULES_PATH=str(limits),
        SECKILL_DEV="1",  # the published secrets: a benchmark on one machine
    )
    database = f"seckill_bench_{os.getpid()}"
    postgres_url = _postgres_database(database, create=True)
    ports = {
        name: free_port() for name in ("bare", "one", "two", "shed", "plain", "watch", "select")
    }
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    secret = settings.jwt.secret
    naive = [sys.executable, str(ROOT / "benchmarks" / "naive.py")]
    stock = 10_000_000
    results: list[Result] = []
    extras: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            plain = {"SECKILL_REDIS_PIPELINE_MAX": "1", "SECKILL_REDIS_PIPELINES_IN_FLIGHT": "64"}
            commands: dict[str, tuple[list[str], dict[str, str]]] = {
                "bare": (
                    [sys.executable, str(ROOT / "benchmarks" / "bare.py"), str(ports["bare"])],
                    {},
                ),
                "one": (_gateway(ports["one"], "--workers", "1"), {}),
                "two": (_gateway(ports["two"], "--workers", "2"), {}),
                "shed": (_gateway(ports["shed"]), {"SECKILL_PROTECTION_MAX_IN_FLIGHT": "1"}),
                # "before": one script call per round trip, the shape coalescing replaced
                "plain": (_gateway(ports["plain"]), plain),
                "watch": (
                    [*naive, str(ports["watch"]), "watch", redis.url, str(stock), secret],
                    {},
                ),
                "select": (
                    [*naive, str(ports["select"]), "select", postgres_url, str(stock), secret],
                    {},
                ),
            }
            for command, extra_env in commands.values():
                stack.enter_context(process(command, {**env, **extra_env}, work))
            gateways = ("one", "two", "shed", "plain")
            for name in url:
                _wait_http(f"{url[name]}/healthz" if name in gateways else url[name])
            now = datetime.now(tz=UTC)
            window = {
                "starts_at": (now.replace(year=now.year - 1)).isoformat(),
                "ends_at": (now.replace(year=now.year + 1)).isoformat(),
            }
            for activity_id, quantity, limit in (
                ("buy", stock, 1000),
                ("gone", 0, 1),
                ("limited", stock, 1000),
            ):
                _post(f"{url['one']}/admin/v1/activities", {
                    "id": activity_id, "sku_id": "sku", "title": "bench", "price_cents": 100,
                    "stock": quantity, "per_user_limit": limit, "payment_timeout_s": 900,
                    **window,
                }, admin)  # fmt: skip
            buy, gone = "/api/v1/activities/buy/orders", "/api/v1/activities/gone/orders"
            limited = "/api/v1/activities/limited/orders"
            # warm every gateway's token cache and sold-out mark as a live sale would have, and
            # its purchase path (Redis's first growth of the sale's keys is not the steady state)
            for name in ("one", "two", "plain"):
                for path in (gone,) if quick else (gone, buy):
                    wrk("warm-up", url[name], path, 64, 2 if quick else 5, tokens)
            headline = ("bare aiohttp+uvloop handler", "sold-out fast path",
                        "purchase (reserve_stock.lua)")  # fmt: skip
            scenarios = [
                (name, base, path, connections)
                for connections in connection_counts
                for name, base, path in (
                    ("bare aiohttp+uvloop handler", url["bare"], buy),
                    ("sold-out fast path", url["one"], gone),
                    ("purchase (reserve_stock.lua)", url["one"], buy),
                    ("naive WATCH/MULTI in Redis", url["watch"], buy),
                    ("naive SELECT ... FOR UPDATE in PostgreSQL", url["select"], buy),
                    ("rate-limited (429)", url["one"], limited),
                    ("shed (503, max_in_flight 1)", url["shed"], buy),
                    ("sold-out, serve --workers 2", url["two"], gone),
                    ("purchase, serve --workers 2", url["two"], buy),
                    ("purchase, one script call per round trip (before)", url["plain"], buy),
                )
                # past 64 connections only the headline paths (their p99 against bare's)
                if connections == 64 or name in headline
            ]
            import redis as redis_client

            control = redis_client.Redis(port=redis.port)
            samples: dict[tuple[str, int], list[Result]] = {}
            # interleaved rounds: a slow spell of the machine hits every path, not just one
            for _ in range(repeat):
                for name, base, path, connections in scenarios:
                    result = wrk(name, base, path, connections, seconds, tokens)
                    samples.setdefault((name, connections), []).append(result)
                for policy in ("always", "everysec"):
                    # durability: the same purchase path, every write fsynced before the reply
                    control.config_set("appendfsync", policy)
                    name = f"purchase, appendfsync {policy}"
                    result = wrk(name, url["one"], buy, 64, seconds, tokens)
                    samples.setdefault((name, 64), []).append(result)
                control.config_set("appendfsync", "everysec")
            sold = control.llen("naive:orders")
            left = int(control.get("naive:stock") or 0)
            extras["naive_watch_oversold"] = left + sold != stock
            from seckill.scripts import Scripts

            extras["redis_benchmark_reserve_stock"] = _redis_benchmark(
                redis.port, Scripts.from_dir().reserve_stock.sha, seconds
            )
            control.close()
            extras["naive_select_oversold"] = _select_oversold(postgres_url, stock)
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
        _postgres_database(database, create=False)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "when": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "seconds_per_run": seconds,
        "repeats": repeat,
        "results": [asdict(r) for r in results],
        "extras": extras,
    }


def _select_oversold(postgres_url: str, stock: int) -> bool:
    import asyncio

    import asyncpg

    async def check() -> bool:
        connection = await asyncpg.connect(postgres_url)
        try:
            left = await connection.fetchval("SELECT left_ FROM naive_stock WHERE id = 'a'")
            sold = await connection.fetchval("SELECT COUNT(*) FROM naive_orders")
            return bool(left + sold != stock)
        finally:
            await connection.close()

    return asyncio.run(check())


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 12's targets (issue 6's p99 and naive-design bars), from this very run."""
    by = {(r["name"], r["connections"]): r for r in report["results"]}
    out: list[tuple[str, str, bool]] = []

    def get(name: str, connections: int) -> dict[str, Any] | None:
        return by.get((name, connections))

    sold_out = get("sold-out fast path", 64)
    purchase = get("purchase (reserve_stock.lua)", 64)
    if sold_out:
        out.append(("sold-out >= 0.9x bare (64 conn)", f"{sold_out['ratio_to_bare']:.2f}x",
                    sold_out["ratio_to_bare"] >= 0.9))  # fmt: skip
    if purchase:
        out.append(("purchase >= 0.5x bare (64 conn)", f"{purchase['ratio_to_bare']:.2f}x",
                    purchase["ratio_to_bare"] >= 0.5))  # fmt: skip
    bare256 = get("bare aiohttp+uvloop handler", 256)
    for name in ("sold-out fast path", "purchase (reserve_stock.lua)"):
        row = get(name, 256)
        if row and bare256:
            factor = row["p99_ms"] / bare256["p99_ms"]
            out.append((f"{name}: p99 at 256 <= 2x bare's", f"{factor:.2f}x", factor <= 2.0))
    watch = get("naive WATCH/MULTI in Redis", 64)
    if purchase and watch:
        watch_ok = watch["requests_per_s"] - watch["non_2xx"] / max(report["seconds_per_run"], 1)
        factor = purchase["requests_per_s"] / max(watch_ok, 1.0)
        out.append(("purchase >= 10x WATCH/MULTI (successful req/s)", f"{factor:.1f}x",
                    factor >= 10))  # fmt: skip
    extras = report.get("extras", {})
    oversold = [k for k in ("naive_watch_oversold", "naive_select_oversold") if extras.get(k)]
    out.append(("zero oversell in the designs that claim correctness",
                "oversold: " + (", ".join(oversold) or "none"), not oversold))  # fmt: skip
    return out


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# seckill benchmarks, {report['when']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, "
        f"Linux {machine['kernel']}, Python {machine['python']}, Redis {machine['redis']}, "
        f"{machine['wrk']}. One gateway process unless said; wrk -t1, "
        f"{report['seconds_per_run']} s per run, median of {report['repeats']} interleaved "
        "rounds (all samples in the JSON).",
        "",
        "Ratio to bare: the ratio within each round, median over the rounds. Non-2xx on the naive",
        "designs are their failures (409 conflict after 3 optimistic tries, or errors).",
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
    extras = report.get("extras", {})
    bench = extras.get("redis_benchmark_reserve_stock")
    if bench:
        lines += [
            "",
            f"redis-benchmark, EVALSHA reserve_stock.lua directly (64 clients, unique users and "
            f"keys): {bench['requests_per_s']:,.0f} scripts/s, p50 {bench['p50_ms']} ms "
            "(the Redis ceiling).",
        ]
    lines += ["", "| target | this run | met |", "|---|---|---|"]
    for name, value, met in targets(report):
        lines.append(f"| {name} | {value} | {'yes' if met else '**not met**'} |")
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
