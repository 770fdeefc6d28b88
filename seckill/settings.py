"""Process settings: config/seckill.toml defaults, overridden by SECKILL_<SECTION>_<KEY>."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlparse

from seckill import resources


class SettingsError(ValueError):
    """A setting that does not parse or is out of range; the message names the key."""


# scheme://user:password@ -> scheme://user:***@ (a password never reaches a message)
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^\s/]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(r"\1:***@", text)


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    port: int
    workers: int
    shutdown_timeout_s: float
    max_body_bytes: int
    var_dir: str
    metrics_dir: str
    # the edge: deadlines and budgets every connection meets before a handler runs
    header_timeout_s: float
    keepalive_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_headers: int
    max_field_size: int
    max_connections: int
    max_connections_per_peer: int
    ops_host: str
    ops_port: int
    # order POSTs answered by the connection's protocol (web/lane.py); off: by aiohttp's loop
    order_lane: bool


@dataclasses.dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    max_connections: int
    socket_timeout_s: float
    connect_timeout_s: float
    pipeline_max: int
    pipelines_in_flight: int
    appendfsync: str
    maxmemory: str
    durability: str
    replica_wait_ms: int

    @property
    def replica_wait(self) -> int | None:
        """Milliseconds an accepted order waits for a replica; None with durability "local"."""
        return self.replica_wait_ms if self.durability == "replicated" else None


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str


@dataclasses.dataclass(frozen=True, slots=True)
class JwtSettings:
    secret: str
    default_ttl_s: int
    leeway_s: int
    max_lifetime_s: int


@dataclasses.dataclass(frozen=True, slots=True)
class AdminSettings:
    token: str


@dataclasses.dataclass(frozen=True, slots=True)
class PaymentSettings:
    secret: str
    tolerance_s: int
    # a provider with an API (WeChat Pay): its own settings come from SECKILL_WECHATPAY_*
    # (seckill/payments/wechatpay.py); these pace the loops that talk to it
    deadline_backoff_s: float
    deadline_backoff_max_s: float
    hold_ceiling_s: float
    reconcile_interval_s: float
    reconcile_quiet_s: float
    refund_interval_s: float
    refund_backoff_max_s: float
    refund_follow_up_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class PurchaseSettings:
    idempotency_ttl_s: int
    refresh_interval_s: float
    negative_cache_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class WriterSettings:
    batch_size: int
    block_ms: int
    max_rows_per_s: float
    claim_idle_ms: int
    retry_idle_ms: int
    max_deliveries: int
    trim_interval_s: float
    consumer: str
    metrics_port: int
    backlog_ceiling: int


@dataclasses.dataclass(frozen=True, slots=True)
class SweeperSettings:
    interval_s: float
    batch_size: int


@dataclasses.dataclass(frozen=True, slots=True)
class RetirerSettings:
    interval_s: float
    grace_s: float
    batch_size: int


@dataclasses.dataclass(frozen=True, slots=True)
class ProtectionSettings:
    max_in_flight: int
    redis_fail_max: int
    redis_reset_timeout_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class LimitsSettings:
    rules_path: str
    gateway_processes: int


@dataclasses.dataclass(frozen=True, slots=True)
class RiskSettings:
    rules_path: str
    hash_key: str


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamsSettings:
    reviews_url: str
    recommendations_url: str
    timeout_s: float
    fail_max: int
    reset_timeout_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class DataSettings:
    cipher: str
    keys: str
    hash_key: str


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    redis: RedisSettings
    database: DatabaseSettings
    jwt: JwtSettings
    admin: AdminSettings
    payment: PaymentSettings
    purchase: PurchaseSettings
    writer: WriterSettings
    sweeper: SweeperSettings
    protection: ProtectionSettings
    limits: LimitsSettings
    risk: RiskSettings
    upstreams: UpstreamsSettings
    retirer: RetirerSettings
    data: DataSettings

    @property
    def database_url(self) -> str:
        """The configured database, or SQLite under var_dir (the embedded default)."""
        return self.database.url or f"sqlite:///{Path(self.server.var_dir) / 'orders.db'}"

    def replace(self, section: str, **values: Any) -> Settings:
        """A copy with some keys of one section changed (CLI flags, tests)."""
        current = getattr(self, section)
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **values)})


_SECTIONS: dict[str, type[Any]] = {
    field.name: get_type_hints(Settings)[field.name] for field in dataclasses.fields(Settings)
}


def _coerce(name: str, env_name: str | None, kind: type[Any], raw: Any) -> Any:
    where = f"{name} ({env_name})" if env_name else name
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"invalid setting {where}: expected true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, bool):
            raise SettingsError(f"invalid setting {where}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise SettingsError(
                f"invalid setting {where}: expected an integer, got {raw!r}"
            ) from None
    if kind is float:
        if isinstance(raw, bool):
            raise SettingsError(f"invalid setting {where}: expected a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise SettingsError(
                f"invalid setting {where}: expected a number, got {raw!r}"
            ) from None
    if not isinstance(raw, str):
        raise SettingsError(f"invalid setting {where}: expected a string, got {raw!r}")
    return raw


def _check(settings: Settings) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            env = "SECKILL_" + key.replace(".", "_").upper()
            raise SettingsError(f"invalid setting {key} ({env}): {why}")

    s = settings
    need(0 <= s.server.port <= 65535, "server.port", "must be 0..65535")
    need(1 <= s.server.workers <= 256, "server.workers", "must be 1..256")
    need(s.server.shutdown_timeout_s >= 0, "server.shutdown_timeout_s", "must be >= 0")
    need(s.server.max_body_bytes >= 64, "server.max_body_bytes", "must be >= 64")
    need(bool(s.server.var_dir), "server.var_dir", "must not be empty")
    need(s.server.header_timeout_s > 0, "server.header_timeout_s", "must be > 0")
    need(s.server.keepalive_timeout_s > 0, "server.keepalive_timeout_s", "must be > 0")
    need(s.server.body_timeout_s > 0, "server.body_timeout_s", "must be > 0")
    need(
        1024 <= s.server.max_header_bytes <= 1024 * 1024,
        "server.max_header_bytes",
        "must be 1024..1048576",
    )
    need(8 <= s.server.max_headers <= 1024, "server.max_headers", "must be 8..1024")
    need(
        256 <= s.server.max_field_size <= s.server.max_header_bytes,
        "server.max_field_size",
        "must be 256..server.max_header_bytes",
    )
    need(s.server.max_connections >= 1, "server.max_connections", "must be >= 1")
    need(
        1 <= s.server.max_connections_per_peer <= s.server.max_connections,
        "server.max_connections_per_peer",
        "must be 1..server.max_connections",
    )
    need(0 <= s.server.ops_port <= 65535, "server.ops_port", "must be 0..65535")
    need(bool(s.server.ops_host), "server.ops_host", "must not be empty")
    if s.redis.url:
        need(*_redis_url_problem(s.redis.url))
    need(1 <= s.redis.max_connections <= 10_000, "redis.max_connections", "must be 1..10000")
    need(s.redis.socket_timeout_s > 0, "redis.socket_timeout_s", "must be > 0")
    need(s.redis.connect_timeout_s > 0, "redis.connect_timeout_s", "must be > 0")
    need(1 <= s.redis.pipeline_max <= 10_000, "redis.pipeline_max", "must be 1..10000")
    need(
        1 <= s.redis.pipelines_in_flight <= s.redis.max_connections,
        "redis.pipelines_in_flight",
        "must be 1..redis.max_connections",
    )
    need(
        s.redis.appendfsync in {"always", "everysec", "no"},
        "redis.appendfsync",
        f"expected always, everysec or no, got {s.redis.appendfsync!r}",
    )
    need(
        s.redis.durability in {"local", "replicated"},
        "redis.durability",
        f"expected local or replicated, got {s.redis.durability!r}",
    )
    need(
        1 <= s.redis.replica_wait_ms <= s.redis.socket_timeout_s * 1000,
        "redis.replica_wait_ms",
        "must be 1..redis.socket_timeout_s in ms (a WAIT must end before the call times out)",
    )
    if s.database.url:
        scheme = urlparse(s.database.url).scheme
        need(
            scheme in {"postgresql", "postgres", "sqlite"},
            "database.url",
            f"expected postgresql://... or sqlite:///path, got {redact(s.database.url)!r}",
        )
    need(len(s.jwt.secret) >= 32, "jwt.secret", "must be at least 32 bytes (HS256 key strength)")
    need(s.jwt.default_ttl_s > 0, "jwt.default_ttl_s", "must be > 0")
    need(0 <= s.jwt.leeway_s <= 300, "jwt.leeway_s", "must be 0..300")
    need(
        s.jwt.default_ttl_s <= s.jwt.max_lifetime_s,
        "jwt.max_lifetime_s",
        "must be >= jwt.default_ttl_s",
    )
    need(len(s.admin.token) >= 16, "admin.token", "must be at least 16 characters")
    need(len(s.payment.secret) >= 16, "payment.secret", "must be at least 16 characters")
    need(s.payment.tolerance_s > 0, "payment.tolerance_s", "must be > 0")
    for key in (
        "deadline_backoff_s",
        "deadline_backoff_max_s",
        "hold_ceiling_s",
        "reconcile_interval_s",
        "reconcile_quiet_s",
        "refund_interval_s",
        "refund_backoff_max_s",
        "refund_follow_up_s",
    ):
        need(getattr(s.payment, key) > 0, f"payment.{key}", "must be > 0")
    need(
        s.purchase.idempotency_ttl_s >= 86_400,
        "purchase.idempotency_ttl_s",
        "must be >= 86400 (the contract keeps keys at least 24 h)",
    )
    need(
        0 < s.purchase.refresh_interval_s <= 1.0,
        "purchase.refresh_interval_s",
        "must be in (0, 1] (stock_left may lag by at most 1 s)",
    )
    need(s.purchase.negative_cache_s >= 0, "purchase.negative_cache_s", "must be >= 0")
    need(1 <= s.writer.batch_size <= 10_000, "writer.batch_size", "must be 1..10000")
    need(1 <= s.writer.block_ms <= 60_000, "writer.block_ms", "must be 1..60000")
    need(s.writer.max_rows_per_s > 0, "writer.max_rows_per_s", "must be > 0")
    need(s.writer.claim_idle_ms >= 1000, "writer.claim_idle_ms", "must be >= 1000")
    need(s.writer.retry_idle_ms >= 10, "writer.retry_idle_ms", "must be >= 10")
    need(1 <= s.writer.max_deliveries <= 1000, "writer.max_deliveries", "must be 1..1000")
    need(s.writer.trim_interval_s > 0, "writer.trim_interval_s", "must be > 0")
    need(0 <= s.writer.metrics_port <= 65535, "writer.metrics_port", "must be 0..65535")
    need(
        0 < s.sweeper.interval_s <= 1.5,
        "sweeper.interval_s",
        "must be in (0, 1.5] (expiry within 2 s of the deadline)",
    )
    need(1 <= s.sweeper.batch_size <= 10_000, "sweeper.batch_size", "must be 1..10000")
    need(s.protection.max_in_flight >= 1, "protection.max_in_flight", "must be >= 1")
    for key, url in (
        ("upstreams.reviews_url", s.upstreams.reviews_url),
        ("upstreams.recommendations_url", s.upstreams.recommendations_url),
    ):
        need(
            not url or (urlparse(url).scheme in {"http", "https"} and "{activity_id}" in url),
            key,
            "must be an http(s) URL template containing {activity_id}, or empty",
        )
    need(s.upstreams.timeout_s > 0, "upstreams.timeout_s", "must be > 0")
    need(s.upstreams.fail_max >= 1, "upstreams.fail_max", "must be >= 1")
    need(s.upstreams.reset_timeout_s > 0, "upstreams.reset_timeout_s", "must be > 0")
    need(
        1 <= s.limits.gateway_processes <= 100_000,
        "limits.gateway_processes",
        "must be 1..100000",
    )
    need(_risk_key_ok(s.risk.hash_key), "risk.hash_key", "must be base64 of at least 16 bytes")
    need(s.protection.redis_fail_max >= 1, "protection.redis_fail_max", "must be >= 1")
    need(
        s.protection.redis_reset_timeout_s > 0,
        "protection.redis_reset_timeout_s",
        "must be > 0",
    )
    need(
        re.fullmatch(r"(?i)[0-9]+(b|k|kb|m|mb|g|gb)?", s.redis.maxmemory) is not None,
        "redis.maxmemory",
        f'expected a size such as "1gb" or "512mb", got {s.redis.maxmemory!r}',
    )
    need(s.writer.backlog_ceiling >= 0, "writer.backlog_ceiling", "must be >= 0 (0: off)")
    need(0 < s.retirer.interval_s <= 60, "retirer.interval_s", "must be in (0, 60]")
    need(
        0 <= s.retirer.grace_s <= 50,
        "retirer.grace_s",
        "must be in [0, 50] (an ended order leaves Redis within a minute)",
    )
    need(1 <= s.retirer.batch_size <= 10_000, "retirer.batch_size", "must be 1..10000")
    from seckill.personal import settings_problem

    data_problem = settings_problem(s.data.keys, s.data.cipher, s.data.hash_key)
    need(data_problem is None, *(data_problem or ("data.keys", "")))


def _redis_url_problem(url: str) -> tuple[bool, str, str]:
    """need()'s arguments for the Redis URL: one node, a Cluster or a Sentinel primary."""
    from seckill.connections import parse

    try:
        target = parse(url)
    except ValueError as exc:
        return False, "redis.url", f"{exc}; got {redact(url)!r}"
    if target is None:
        parsed = urlparse(url)
        return (
            bool(parsed.hostname or parsed.path),
            "redis.url",
            f"expected redis://host:port/db, got {redact(url)!r}",
        )
    return True, "redis.url", ""


def _risk_key_ok(text: str) -> bool:
    if not text:
        return True
    try:
        return len(base64.b64decode(text, validate=True)) >= 16
    except ValueError:
        return False


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML defaults, apply SECKILL_* overrides and validate; raise SettingsError."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("SECKILL_CONFIG"):
        path = Path(environ["SECKILL_CONFIG"])
    path = path or resources.config_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from exc

    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        table = raw.get(section, {})
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = f"{section}.{field.name}"
            env_name = f"SECKILL_{section}_{field.name}".upper()
            if env_name in environ:
                values[field.name] = _coerce(key, env_name, hints[field.name], environ[env_name])
            elif field.name in table:
                values[field.name] = _coerce(key, None, hints[field.name], table[field.name])
            else:
                raise SettingsError(f"missing setting {key} in {path}")
        unknown = set(table) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"unknown setting {section}.{sorted(unknown)[0]} in {path}")
        sections[section] = cls(**values)
    settings = Settings(**sections)
    _check(settings)
    return settings
