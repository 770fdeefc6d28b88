"""Settings: TOML defaults, SECKILL_* overrides, and one clear line naming a bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from seckill import settings as settings_module
from seckill.settings import SettingsError


def test_defaults_load_and_env_overrides_win() -> None:
    loaded = settings_module.load(
        environ={
            "SECKILL_REDIS_URL": "redis://10.0.0.5:6380/2",
            "SECKILL_SERVER_PORT": "9001",
            "SECKILL_REDIS_MAX_CONNECTIONS": "32",
            "SECKILL_JWT_SECRET": "s" * 40,
            "SECKILL_ADMIN_TOKEN": "a" * 20,
            "SECKILL_PAYMENT_SECRET": "p" * 20,
            "SECKILL_DATABASE_URL": "postgresql://localhost/orders",
        }
    )
    assert loaded.redis.url == "redis://10.0.0.5:6380/2"
    assert loaded.server.port == 9001
    assert loaded.redis.max_connections == 32
    assert loaded.jwt.secret == "s" * 40
    assert loaded.admin.token == "a" * 20
    assert loaded.payment.secret == "p" * 20
    assert loaded.database.url == "postgresql://localhost/orders"
    assert settings_module.load(environ={}).server.max_body_bytes == 4096


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"SECKILL_SERVER_PORT": "eighty"}, "server.port (SECKILL_SERVER_PORT)"),
        ({"SECKILL_SERVER_PORT": "70000"}, "server.port"),
        ({"SECKILL_REDIS_URL": "http://x"}, "redis.url"),
        ({"SECKILL_DATABASE_URL": "mysql://x"}, "database.url"),
        ({"SECKILL_REDIS_APPENDFSYNC": "sometimes"}, "redis.appendfsync"),
        ({"SECKILL_JWT_SECRET": "short"}, "jwt.secret"),
        ({"SECKILL_PURCHASE_IDEMPOTENCY_TTL_S": "3600"}, "purchase.idempotency_ttl_s"),
        ({"SECKILL_PURCHASE_REFRESH_INTERVAL_S": "5"}, "purchase.refresh_interval_s"),
        ({"SECKILL_REDIS_SOCKET_TIMEOUT_S": "soon"}, "redis.socket_timeout_s"),
    ],
)
def test_a_bad_value_names_its_key(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_module.load(environ=env)
    message = str(caught.value)
    assert names in message
    assert "\n" not in message


def test_unknown_and_missing_keys_in_the_file(tmp_path: Path) -> None:
    source = settings_module.resources.config_path().read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(source.replace("[server]", "[server]\nprot = 1", 1))
    with pytest.raises(SettingsError, match=r"unknown setting server\.prot"):
        settings_module.load(bad, environ={})
    bad.write_text(source.replace("port = 8080", "", 1))
    with pytest.raises(SettingsError, match=r"missing setting server\.port"):
        settings_module.load(bad, environ={})


def test_the_dashboard_only_uses_metrics_seckill_exports() -> None:
    """Every metric the Grafana dashboard queries is in a real exposition of seckill's."""
    import json
    import re

    from seckill import resources
    from seckill.orders.sweeper import Sweeper
    from seckill.orders.writer import Writer
    from seckill.web.app import create_app
    from seckill.web.state import SERVICES

    settings = settings_module.load(environ={"SECKILL_REDIS_URL": "redis://127.0.0.1:1/0"})
    metrics = create_app(settings)[SERVICES].metrics  # nothing connects before startup
    metrics.add_writer(Writer(None, None), Sweeper(None))  # type: ignore[arg-type]
    exposition = metrics.render().decode()
    dashboard = json.loads((resources.config_path().parent / "grafana-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"seckill_[a-z_]+", target["expr"])
    }
    assert len(used) >= 12
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert f"# HELP {base}" in exposition or f"# HELP {base.removesuffix('_total')}" in (
            exposition
        ), f"{name} is not exported"
