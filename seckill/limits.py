"""Rate-limit rules: hot-reloaded from config/limits.toml, a bad reload never fatal.

Two tiers, as process settings and rules are kept apart: settings are read once at start;
rules change during a sale. Each process polls the file's modification time; a file that does
not parse or validate is counted and logged, and the rules in force stay as they were.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seckill.rulefile import RuleFile
from seckill.stock import Limits
from seckill.throttle import LocalBucket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rule:
    admission_rate_per_s: float = 0.0
    admission_burst: float = 0.0
    user_rate_per_s: float = 0.0
    user_burst: float = 0.0
    ip_rate_per_s: float = 0.0
    ip_burst: float = 0.0
    shadow: bool = False

    def redis_limits(self, factor: float = 1.0) -> Limits:
        """The buckets the reserve script takes tokens from (admission scaled by the flag)."""
        return _redis_limits(self, factor)

    def _redis_limits(self, factor: float) -> Limits:
        admission = self.admission_rate_per_s * factor
        return Limits(
            user_rate=self.user_rate_per_s,
            user_burst=max(self.user_burst, 1.0) if self.user_rate_per_s else 0.0,
            ip_rate=self.ip_rate_per_s,
            ip_burst=max(self.ip_burst, 1.0) if self.ip_rate_per_s else 0.0,
            admission_rate=admission,
            admission_burst=max(self.admission_burst * factor, 1.0) if admission else 0.0,
            shadow=self.shadow,
        )


# (rule, admission factor) -> its Limits: the same few per sale, built once each
_redis_limits = functools.lru_cache(maxsize=1024)(Rule._redis_limits)

_FIELDS = {f.name: f.type for f in dataclasses.fields(Rule)}


@dataclass(frozen=True, slots=True)
class OrderRule:
    """Per-user buckets on order reads and cancels, kept in this process (no Redis)."""

    read_rate_per_s: float = 2.0
    read_burst: float = 10.0
    cancel_rate_per_s: float = 0.5
    cancel_burst: float = 5.0
    # GET .../queue: the mini program polls it; faster than this is a bot
    queue_rate_per_s: float = 2.0
    queue_burst: float = 10.0


_ORDER_FIELDS = {f.name for f in dataclasses.fields(OrderRule)}
# users whose order buckets one process remembers; past it they start over (full buckets)
_ORDER_BUCKETS_MAX = 100_000


def _order_rule(table: dict[str, Any]) -> OrderRule:
    values: dict[str, float] = {}
    for name, value in table.items():
        if name not in _ORDER_FIELDS:
            raise ValueError(f"orders: unknown key {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"orders.{name} must be a number >= 0")
        values[name] = float(value)
    return OrderRule(**values)


def _rule(table: dict[str, Any], base: Rule, where: str) -> Rule:
    values: dict[str, Any] = {}
    for name, value in table.items():
        if name not in _FIELDS:
            raise ValueError(f"{where}: unknown key {name!r}")
        if name == "shadow":
            if not isinstance(value, bool):
                raise ValueError(f"{where}.shadow must be true or false")
        elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{where}.{name} must be a number >= 0")
        values[name] = value if name == "shadow" else float(value)
    return dataclasses.replace(base, **values)


def parse(text: str) -> tuple[Rule, dict[str, Rule]]:
    """The default rule and the per-activity ones; ValueError naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from exc
    unknown = set(data) - {"default", "activity", "orders"}
    if unknown:
        raise ValueError(f"unknown table [{sorted(unknown)[0]}]")
    default = _rule(data.get("default", {}), Rule(), "default")
    per_activity = {
        activity_id: _rule(table, default, f"activity.{activity_id}")
        for activity_id, table in data.get("activity", {}).items()
    }
    return default, per_activity


class Rules(RuleFile):
    """config/limits.toml in force: rate limits per activity and per user's order reads."""

    kind = "limits"

    def __init__(self, path: Path, *, gateway_processes: int = 1) -> None:
        super().__init__(path)
        self.gateway_processes = gateway_processes
        self.default = Rule()
        self.per_activity: dict[str, Rule] = {}
        self.orders = OrderRule()
        # (scope, user) -> bucket; scope: read, cancel
        self._order_buckets: dict[tuple[str, str], tuple[OrderRule, LocalBucket]] = {}
        # (activity, scope, mode) -> refusals; scope: admission, user, ip
        self.refused: dict[tuple[str, str, str], int] = {}
        self._buckets: dict[str, tuple[Rule, float, LocalBucket]] = {}
        self.maybe_reload()

    def for_activity(self, activity_id: str) -> Rule:
        return self.per_activity.get(activity_id, self.default)

    def apply(self, text: str) -> None:
        default, per_activity = parse(text)
        orders = parse_orders(text)
        self.default, self.per_activity, self.orders = default, per_activity, orders

    def admit(self, activity_id: str, rule: Rule, factor: float) -> float:
        """The local admission bucket: 0 when admitted, else seconds until a token is back.

        In shadow mode a refusal is counted and 0 returned.
        """
        if rule.admission_rate_per_s <= 0:
            return 0.0
        held = self._buckets.get(activity_id)
        if held is None or held[0] != rule or held[1] != factor:
            rate = rule.admission_rate_per_s * factor / self.gateway_processes
            burst = max(rule.admission_burst * factor / self.gateway_processes, 1.0)
            held = (rule, factor, LocalBucket(rate, burst))
            self._buckets[activity_id] = held
        wait = held[2].try_take(1.0)
        if wait > 0:
            self.count(activity_id, "admission", rule.shadow)
            if rule.shadow:
                return 0.0
        return wait

    def take_order(self, scope: str, user_id: str) -> tuple[float, float]:
        """One ``scope`` ("read", "cancel" or "queue") for the user: (0, burst) when allowed,
        else (seconds until a token is back, burst). A rate of 0 turns the limit off."""
        rule = self.orders
        if scope == "read":
            rate, burst = rule.read_rate_per_s, rule.read_burst
        elif scope == "queue":
            rate, burst = rule.queue_rate_per_s, rule.queue_burst
        else:
            rate, burst = rule.cancel_rate_per_s, rule.cancel_burst
        if rate <= 0:
            return 0.0, burst
        held = self._order_buckets.get((scope, user_id))
        if held is None or held[0] is not rule:
            if len(self._order_buckets) >= _ORDER_BUCKETS_MAX:
                self._order_buckets.clear()
            held = (rule, LocalBucket(rate, max(burst, 1.0)))
            self._order_buckets[scope, user_id] = held
        wait = held[1].try_take(1.0)
        if wait > 0:
            self.count("-", f"order_{scope}", False)
        return wait, burst

    def count(self, activity_id: str, scope: str, shadow: bool) -> None:
        """One refusal (or, in shadow mode, one that would have been)."""
        key = (activity_id, scope, "shadow" if shadow else "enforced")
        self.refused[key] = self.refused.get(key, 0) + 1


def parse_orders(text: str) -> OrderRule:
    """The [orders] table (per-user read and cancel buckets); ValueError naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from exc
    return _order_rule(data.get("orders", {}))


def retry_after_s(wait_s: float) -> int:
    """Retry-After in whole seconds, at least 1."""
    return max(1, math.ceil(wait_s))
