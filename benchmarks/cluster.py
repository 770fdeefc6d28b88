"""seckill on a Redis Cluster against one Redis, and the order writer with 1 vs 2 processes.

    .venv/bin/python benchmarks/cluster.py            # the full run (several minutes)
    .venv/bin/python benchmarks/cluster.py --quick    # a smoke of the harness (seconds)

Everything runs on loopback: one redis-server and a local cluster of 3 masters with a replica
each (seckill.topology), a `seckill serve` on each, wrk as in benchmarks/run.py. Two figures:

- purchase and sold-out, cluster vs one Redis: interleaved wrk rounds; the ratio is taken
  within each round (same machine conditions) and the median reported;
- writer throughput on the cluster: orders already waiting in 30 activities (spread over the
  three masters), then 1 or 2 `seckill writer` processes into PostgreSQL, rows/s from the
  first stored row to the last; the ratio 2/1 within each round.

Results go to benchmarks/results/<time>-cluster.{json,md}. On a 2-core machine the cluster's
six redis-servers, the gateway and wrk share the cores: read the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import (  # noqa: E402
    Result,
    _gateway,
    _machine,
    _post,
    _postgres_database,
    _wait_http,
    process,
    wrk,
)
from seckill import connections  # noqa: E402
from seckill import settings as settings_module  # noqa: E402
from seckill.activities import Activity  # noqa: E402
from seckill.auth import UserAuth  # noqa: E402
from seckill.embedded import EmbeddedRedis, free_port  # noqa: E402
from seckill.scripts import Coalescer, Scripts  # noqa: E402
from seckill.stock import Outcome, Stock  # noqa: E402
from seckill.topology import Cluster  # noqa: E402

WRITER_ACTIVITIES = 30
CONNECTIONS = 64


def _window() -> dict[str, str]:
    now = datetime.now(tz=UTC)
    return {
        "starts_at": now.replace(year=now.year - 1).isoformat(),
        "ends_at": now.replace(year=now.year + 1).isoformat(),
    }


def _ratio(runs: list[Result], baseline: list[Result]) -> float:
    """The median over rounds of runs[i] / baseline[i] (req/s)."""
    return round(
        statistics.median(
            r.requests_per_s / b.requests_per_s for r, b in zip(runs, baseline, strict=True)
        ),
        3,
    )


def gateways(
    work: Path, env: dict[str, str], urls: dict[str, str], seconds: float, repeat: int
) -> dict[str, Any]:
    """Purchase and sold-out through `seckill serve` on each Redis, interleaved rounds."""
    settings = settings_module.load(environ={})
    tokens = work / "tokens.txt"
    auth = UserAuth(settings.jwt.secret)
    tokens.write_text("".join(f"Bearer {auth.mint(f'b{i}', 7200)}\n" for i in range(20_000)))
    samples: dict[tuple[str, str], list[Result]] = {}
    with contextlib.ExitStack() as stack:
        served = {}
        for name, redis_url in urls.items():
            port = free_port()
            command = _gateway(port, "--workers", "1")
            stack.enter_context(process(command, {**env, "SECKILL_REDIS_URL": redis_url}, work))
            served[name] = f"http://127.0.0.1:{port}"
        for base in served.values():
            _wait_http(f"{base}/healthz")
            for activity_id, stock in (("buy", 10_000_000), ("gone", 0)):
                _post(f"{base}/admin/v1/activities", {
                    "id": activity_id, "sku_id": "sku", "title": "bench", "price_cents": 100,
                    "stock": stock, "per_user_limit": 1000, "payment_timeout_s": 900,
                    **_window(),
                }, settings.admin.token)  # fmt: skip
            wrk("warm-up", base, "/api/v1/activities/gone/orders", CONNECTIONS, 2, tokens)
        for _ in range(repeat):
            for name, base in served.items():
                for path_name, activity_id in (("purchase", "buy"), ("sold-out", "gone")):
                    path = f"/api/v1/activities/{activity_id}/orders"
                    result = wrk(f"{path_name}, {name}", base, path, CONNECTIONS, seconds, tokens)
                    samples.setdefault((path_name, name), []).append(result)
    figures: dict[str, Any] = {}
    for path_name in ("purchase", "sold-out"):
        single, cluster = samples[(path_name, "single")], samples[(path_name, "cluster")]
        figures[path_name] = {
            "single_req_per_s": [round(r.requests_per_s) for r in single],
            "cluster_req_per_s": [round(r.requests_per_s) for r in cluster],
            "cluster_p99_ms": [r.p99_ms for r in cluster],
            "single_p99_ms": [r.p99_ms for r in single],
            "non_2xx_cluster": [r.non_2xx for r in cluster],
            "ratio_cluster_to_single": _ratio(cluster, single),
        }
    return figures


async def _fill(cluster_url: str, round_id: str, orders: int) -> list[str]:
    """``orders`` accepted orders waiting in 30 new activities (spread over every master)."""
    settings = settings_module.load(environ={"SECKILL_REDIS_URL": cluster_url})
    client = connections.connect(settings.redis)
    stock = Stock(client, Scripts.from_dir(), Coalescer(client, max_batch=256, in_flight=8), 90_000)
    each = -(-orders // WRITER_ACTIVITIES)
    activity_ids = [f"w{round_id}-{n}" for n in range(WRITER_ACTIVITIES)]
    now = int(time.time() * 1000)
    try:
        for activity_id in activity_ids:
            await stock.put_activity(
                Activity(activity_id, "sku", "t", 100, each, 1, now - 1000, now + 3_600_000, 900)
            )
        calls = [(a, f"u{n}") for a in activity_ids for n in range(each)]
        for start in range(0, len(calls), 2000):
            results = await asyncio.gather(
                *(stock.reserve(a, user, "k", 1) for a, user in calls[start : start + 2000])
            )
            assert all(r.outcome is Outcome.OK for r in results), "a reservation was refused"
    finally:
        await connections.close(client)
    return activity_ids


def _stored(postgres_url: str) -> int:
    async def count() -> int:
        import asyncpg

        connection = await asyncpg.connect(postgres_url)
        try:
            with contextlib.suppress(asyncpg.UndefinedTableError):
                return int(await connection.fetchval("SELECT count(*) FROM orders"))
            return 0
        finally:
            await connection.close()

    return asyncio.run(count())


def writer_round(
    work: Path, env: dict[str, str], cluster_url: str, writers: int, orders: int, tag: str
) -> float:
    """Rows/s of ``writers`` `seckill writer` processes draining ``orders`` waiting orders."""
    database = f"seckill_bench_cluster_{os.getpid()}_{tag}"
    postgres_url = _postgres_database(database, create=True)
    try:
        asyncio.run(_fill(cluster_url, tag, orders))
        writer_env = {
            **env,
            "SECKILL_REDIS_URL": cluster_url,
            "SECKILL_DATABASE_URL": postgres_url,
            "SECKILL_WRITER_MAX_ROWS_PER_S": "1000000",  # capacity, not the configured pace
        }
        command = [sys.executable, "-m", "seckill", "--log-level", "WARNING", "writer"]
        with contextlib.ExitStack() as stack:
            for n in range(writers):
                stack.enter_context(
                    process(command, {**writer_env, "SECKILL_WRITER_CONSUMER": f"b{n}"}, work)
                )
            first = last = 0.0
            deadline = time.monotonic() + 600
            while (stored := _stored(postgres_url)) < orders:
                now = time.monotonic()
                if stored and not first:
                    first = now
                if now > deadline:
                    raise RuntimeError(f"writers stored {stored} of {orders} within 600 s")
                time.sleep(0.05)
            last = time.monotonic()
        return orders / max(last - (first or last), 1e-3)
    finally:
        _postgres_database(database, create=False)


def run(seconds: float, repeat: int, orders: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks need wrk (Debian: apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="seckill-bench-cluster-"))
    single = EmbeddedRedis(work / "single", appendfsync="everysec")
    cluster = Cluster(work / "cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env.update(
        SECKILL_DATABASE_URL=f"sqlite:///{work / 'orders.db'}",
        SECKILL_DEV="1",  # the published secrets: a benchmark on one machine
    )
    try:
        urls = {"single": single.start(), "cluster": cluster.start()}
        figures = gateways(work, env, urls, seconds, repeat)
        cluster.flush()
        rounds = []
        for n in range(repeat):
            one = writer_round(work, env, urls["cluster"], 1, orders, f"{n}a")
            two = writer_round(work, env, urls["cluster"], 2, orders, f"{n}b")
            rounds.append((round(one), round(two), round(two / one, 3)))
        figures["writer_on_cluster"] = {
            "orders_per_round": orders,
            "activities": WRITER_ACTIVITIES,
            "rows_per_s_1_writer": [r[0] for r in rounds],
            "rows_per_s_2_writers": [r[1] for r in rounds],
            "ratio_2_to_1": statistics.median(r[2] for r in rounds),
        }
    finally:
        cluster.stop()
        single.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "when": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "seconds_per_run": seconds,
        "connections": CONNECTIONS,
        "repeats": repeat,
        "figures": figures,
    }


def markdown(report: dict[str, Any]) -> str:
    machine, figures = report["machine"], report["figures"]
    writer = figures["writer_on_cluster"]
    lines = [
        f"# seckill on a Redis Cluster, {report['when']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Redis {machine['redis']}. "
        f"One gateway process per topology, wrk -t1 -c{report['connections']}, "
        f"{report['seconds_per_run']} s per run, {report['repeats']} interleaved rounds; ratios "
        "within each round, median. Cluster: 3 masters + 3 replicas on this same machine.",
        "",
        "| path | one Redis, req/s | cluster, req/s | cluster / one |",
        "|---|---|---|---|",
    ]
    for name in ("purchase", "sold-out"):
        f = figures[name]
        lines.append(
            f"| {name} | {statistics.median(f['single_req_per_s']):,.0f} | "
            f"{statistics.median(f['cluster_req_per_s']):,.0f} | "
            f"{f['ratio_cluster_to_single']:.2f} |"
        )
    lines += [
        "",
        f"Writer on the cluster, {writer['orders_per_round']:,} waiting orders in "
        f"{writer['activities']} activities, into PostgreSQL: 1 writer "
        f"{statistics.median(writer['rows_per_s_1_writer']):,.0f} rows/s, 2 writers "
        f"{statistics.median(writer['rows_per_s_2_writers']):,.0f} rows/s, "
        f"2/1 = {writer['ratio_2_to_1']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--orders", type=int, default=30_000, help="orders per writer round")
    parser.add_argument("--quick", action="store_true", help="a smoke of the harness")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    seconds, repeat, orders = (
        (1.0, 1, 600) if args.quick else (args.seconds, args.repeat, args.orders)
    )
    report = run(seconds, repeat, orders)
    table = markdown(report)
    print(table)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = report["when"][:19].replace(":", "").replace("-", "")
        (args.out / f"{stamp}-cluster.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{stamp}-cluster.md").write_text(table)


if __name__ == "__main__":
    main()
