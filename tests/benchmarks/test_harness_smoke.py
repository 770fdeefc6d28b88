"""A tiny smoke of the benchmark harness: it runs end to end and its figures are sane.

It checks the harness, not performance: no wall-clock figure is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.alone
def test_the_harness_measures_every_path() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    names = {r["name"] for r in report["results"]}
    assert {
        "bare aiohttp+uvloop handler",
        "sold-out fast path",
        "purchase (reserve_stock.lua)",
    } <= names
    by_name = {r["name"]: r for r in report["results"]}
    assert by_name["bare aiohttp+uvloop handler"]["ratio_to_bare"] == 1.0
    for r in report["results"]:
        assert r["requests"] > 0 and r["socket_errors"] == 0, r
    # the purchase path answered 202 to every request, the sold-out path never did
    assert by_name["purchase (reserve_stock.lua)"]["non_2xx"] == 0
    assert by_name["sold-out fast path"]["non_2xx"] == by_name["sold-out fast path"]["requests"]
    assert report["machine"]["cores"]
    assert {
        "naive WATCH/MULTI in Redis",
        "naive SELECT ... FOR UPDATE in PostgreSQL",
        "rate-limited (429)",
        "shed (503, max_in_flight 1)",
        "purchase, serve --workers 2",
    } <= names
    assert by_name["rate-limited (429)"]["non_2xx"] > 0
    assert by_name["shed (503, max_in_flight 1)"]["non_2xx"] > 0
    extras = report["extras"]
    assert extras["naive_watch_oversold"] is False and extras["naive_select_oversold"] is False
    assert extras["redis_benchmark_reserve_stock"]["requests_per_s"] > 0
