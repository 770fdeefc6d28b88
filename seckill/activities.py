"""The activity: one flash sale of one SKU, and the validation of its admin definition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from seckill import clock, keys
from seckill.errors import InvalidRequest

_FIELDS = (
    "id",
    "sku_id",
    "title",
    "price_cents",
    "stock",
    "per_user_limit",
    "starts_at",
    "ends_at",
    "payment_timeout_s",
)


@dataclass(frozen=True, slots=True)
class Activity:
    id: str
    sku_id: str
    title: str
    price_cents: int
    stock: int
    per_user_limit: int
    starts_at_ms: int
    ends_at_ms: int
    payment_timeout_s: int

    @classmethod
    def from_request(cls, body: Any) -> Activity:
        """Validate an admin POST body; InvalidRequest names the first bad field."""
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object")
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise InvalidRequest(f"unknown field: {unknown[0]}")
        missing = [f for f in _FIELDS if f not in body]
        if missing:
            raise InvalidRequest(f"missing field: {missing[0]}")
        activity_id = _text(body, "id", 64)
        if not keys.ID_PATTERN.fullmatch(activity_id):
            raise InvalidRequest("id must be 1-64 characters of [A-Za-z0-9_-]")
        starts_at_ms = _time(body, "starts_at")
        ends_at_ms = _time(body, "ends_at")
        if ends_at_ms <= starts_at_ms:
            raise InvalidRequest("ends_at must be after starts_at")
        return cls(
            id=activity_id,
            sku_id=_text(body, "sku_id", 64),
            title=_text(body, "title", 200),
            price_cents=_int(body, "price_cents", 0, 10**12),
            stock=_int(body, "stock", 0, 10_000_000),
            per_user_limit=_int(body, "per_user_limit", 1, 1000),
            starts_at_ms=starts_at_ms,
            ends_at_ms=ends_at_ms,
            payment_timeout_s=_int(body, "payment_timeout_s", 1, 86_400),
        )

    @classmethod
    def from_meta(cls, meta: dict[bytes, bytes]) -> Activity:
        """Rebuild from the Redis meta hash."""

        def text(name: str) -> str:
            return meta[name.encode()].decode()

        return cls(
            id=text("id"),
            sku_id=text("sku_id"),
            title=text("title"),
            price_cents=int(text("price_cents")),
            stock=int(text("stock")),
            per_user_limit=int(text("per_user_limit")),
            starts_at_ms=int(text("starts_at_ms")),
            ends_at_ms=int(text("ends_at_ms")),
            payment_timeout_s=int(text("payment_timeout_s")),
        )

    def script_args(self) -> list[str | int]:
        """ARGV of create_activity.lua."""
        return [
            self.id,
            self.sku_id,
            self.title,
            self.price_cents,
            self.stock,
            self.per_user_limit,
            self.starts_at_ms,
            self.ends_at_ms,
            self.payment_timeout_s,
        ]

    def state(self, now_ms: int, stock_left: int, paused: bool = False) -> str:
        """The contract's state: the first that holds of paused, ended, upcoming, sold_out, live."""
        if paused:
            return "paused"
        if now_ms >= self.ends_at_ms:
            return "ended"
        if now_ms < self.starts_at_ms:
            return "upcoming"
        if stock_left <= 0:
            return "sold_out"
        return "live"

    def public(self, now_ms: int, stock_left: int, paused: bool = False) -> dict[str, Any]:
        """Body of GET /api/v1/activities/{id}."""
        return {
            "id": self.id,
            "sku_id": self.sku_id,
            "title": self.title,
            "price_cents": self.price_cents,
            "starts_at": clock.to_rfc3339(self.starts_at_ms),
            "ends_at": clock.to_rfc3339(self.ends_at_ms),
            "state": self.state(now_ms, stock_left, paused),
            "stock_left": max(stock_left, 0),
        }

    def admin(self, now_ms: int, stock_left: int, paused: bool = False) -> dict[str, Any]:
        """Body of the admin create answer: the definition plus the live state."""
        return {
            **self.public(now_ms, stock_left, paused),
            "stock": self.stock,
            "per_user_limit": self.per_user_limit,
            "payment_timeout_s": self.payment_timeout_s,
        }


def _text(body: dict[str, Any], name: str, longest: int) -> str:
    value = body[name]
    if not isinstance(value, str) or not value.strip() or len(value) > longest:
        raise InvalidRequest(f"{name} must be a non-empty string of at most {longest} characters")
    return value


def _int(body: dict[str, Any], name: str, lowest: int, highest: int) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
        raise InvalidRequest(f"{name} must be an integer in {lowest}..{highest}")
    return value


def _time(body: dict[str, Any], name: str) -> int:
    try:
        return clock.parse_rfc3339(body[name])
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{name} must be an RFC 3339 timestamp: {exc}") from None
