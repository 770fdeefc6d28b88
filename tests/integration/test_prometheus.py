"""A real Prometheus (Debian's binary) scrapes live gateways: every dashboard query and every
alert evaluates against what seckill really exports, and an alert fires when its situation
happens. `make test` installs prometheus with the other system tools."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from seckill import resources
from seckill import settings as settings_module
from seckill.embedded import EmbeddedRedis, free_port
from tests.helpers import activity_body, user_headers

CONFIG = resources.config_path().parent
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
SETTINGS = settings_module.load(environ={})


def _binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: `make tools` installs Debian's prometheus package"
    return found


def test_the_alert_rules_are_valid_and_fire_in_their_situations() -> None:
    """Invariant: every shipped alert parses, and fires exactly in the situation it names."""
    promtool = _binary("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(CONFIG / "alerts.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _call(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _answers(url: str) -> bool:
    try:
        return _call(url)[0] == 200
    except OSError:
        return False


def _until(predicate: Callable[[], Any], within_s: float, what: str) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _started(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class Prometheus:
    """Debian's prometheus on a free port, scraping the given targets every second."""

    def __init__(self, work: Path, targets: list[str], rules: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = work / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\n"
            "scrape_configs:\n  - job_name: seckill\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.process = subprocess.Popen(
            [
                _binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = _call(f"{self.url}/api/v1/{path}{query}")
        assert status == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


def _metric_names(expression: str) -> set[str]:
    names = set(re.findall(r"\bseckill_[a-z_]+", expression))
    # a histogram is exported as its _bucket/_sum/_count series
    return {re.sub(r"_(bucket|sum|count)$", "_bucket", n) for n in names}


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    queries: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                queries.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    return queries


def _alert_rules() -> list[tuple[str, str]]:
    import yaml

    loaded = yaml.safe_load((CONFIG / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in loaded["groups"] for r in g["rules"]]


@pytest.fixture
def sale(tmp_path: Path) -> Iterator[tuple[str, str, EmbeddedRedis]]:
    """`seckill up` (gateway + writer + sweeper) and `serve --workers 2` on one private Redis."""
    redis = EmbeddedRedis(tmp_path / "redis", appendfsync="no")
    redis.start()
    env = {
        **CLEAN_ENV,
        "SECKILL_DEV": "1",
        "SECKILL_REDIS_URL": redis.url,
        "SECKILL_PROTECTION_REDIS_RESET_TIMEOUT_S": "30",
    }
    up = _started([sys.executable, "-m", "seckill", "up", "--port", "0"], env, tmp_path)
    port = free_port()
    workers = _started(
        [sys.executable, "-m", "seckill", "serve", "--port", str(port), "--workers", "2"],
        env,
        tmp_path,
    )
    try:
        assert up.stdout is not None and workers.stdout is not None
        up_url = up.stdout.readline().split()[-1]
        assert up_url.startswith("http://"), up_url
        assert workers.stdout.readline().startswith("seckill serving on")
        served = f"http://127.0.0.1:{port}"
        _until(lambda: _answers(f"{served}/healthz"), 30, "serve --workers 2")
        yield up_url, served, redis
    finally:
        _stop(workers)
        _stop(up)
        redis.stop()


def test_prometheus_evaluates_every_dashboard_query_and_alert_on_live_gateways(
    sale: tuple[str, str, EmbeddedRedis], tmp_path: Path
) -> None:
    """Invariant: nothing on the dashboard or in the alerts names a series seckill never
    exports, and a Redis outage fires SeckillBreakerOpen in a real Prometheus."""
    up_url, workers_url, redis = sale
    body = activity_body(stock=5)
    admin = {"Authorization": f"Bearer {SETTINGS.admin.token}"}
    assert _call(f"{up_url}/admin/v1/activities", body, admin)[0] == 201
    for n in range(3):
        status, _ = _call(
            f"{up_url}/api/v1/activities/{body['id']}/orders",
            {"quantity": 1},
            user_headers(SETTINGS, f"u{n}", f"k{n}"),
        )
        assert status == 202
    statuses = {
        _call(
            f"{up_url}/api/v1/activities/{body['id']}/orders",
            {"quantity": 1},
            user_headers(SETTINGS, "hammer", f"h{n}"),
        )[0]
        for n in range(20)
    }
    assert 429 in statuses, "one shopper hammering meets the per-user rate limit"
    for base in (up_url, workers_url):
        _call(f"{base}/api/v1/activities/{body['id']}/reviews")
        _call(f"{base}/api/v1/activities/{body['id']}/orders", {"quantity": 1})  # a 401

    # the alerts as shipped, with every `for:` at 0 s so that a situation fires at once
    rules = tmp_path / "alerts-now.yml"
    rules.write_text(
        re.sub(r"(?m)^(\s+)for: .*$", r"\1for: 0s", (CONFIG / "alerts.yml").read_text())
    )
    targets = [up_url.removeprefix("http://"), workers_url.removeprefix("http://")]
    prometheus = Prometheus(tmp_path, targets, rules)
    try:
        _until(prometheus.ready, 60, "prometheus to start")
        _until(
            lambda: len(prometheus.api("query", query="up == 1")["result"]) == 2,
            60,
            "both gateways scraped",
        )
        exported = _until(
            lambda: (
                (names := prometheus.names()) >= {"seckill_loop_up", "seckill_stock_left"} and names
            ),
            30,
            "the writer's and the catalog's series",
        )
        worker_series = prometheus.api("query", query="seckill_in_flight")["result"]
        assert {s["metric"].get("worker") for s in worker_series} - {None}, (
            "serve --workers 2 labels each worker's figures"
        )
        missing: dict[str, set[str]] = {}
        for expression in _dashboard_queries() + [e for _, e in _alert_rules()]:
            prometheus.api("query", query=expression)  # parses and evaluates
            absent = _metric_names(expression) - exported
            if absent:
                missing[expression] = absent
        assert not missing, f"queries naming series nobody exports: {missing}"
        groups = prometheus.api("rules")["groups"]
        loaded = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        assert set(loaded) == {name for name, _ in _alert_rules()}
        assert set(loaded.values()) == {"ok"}, loaded

        redis.stop()  # Redis gone: purchases trip the redis breaker open
        for n in range(30):
            _call(
                f"{up_url}/api/v1/activities/{body['id']}/orders",
                {"quantity": 1},
                user_headers(SETTINGS, f"late{n}", f"late{n}"),
            )

        def firing() -> bool:
            alerts = prometheus.api("alerts")["alerts"]
            return any(
                a["labels"]["alertname"] == "SeckillBreakerOpen"
                and a["labels"].get("breaker") == "redis"
                and a["state"] == "firing"
                for a in alerts
            )

        _until(firing, 60, "SeckillBreakerOpen to fire")
    finally:
        prometheus.stop()
