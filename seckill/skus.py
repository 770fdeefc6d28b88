"""What one order buys: its SKU, the buyer's tier terms, its address; and the per-SKU invariant.

The gateway resolves an order POST against the cached activity here (SKU known, quantity within
the buyer's limit, address present where required) and hands the reserve script the resulting
terms as arguments; the script re-checks the definition version and decides by Redis TIME.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from seckill.activities import Activity
from seckill.errors import InvalidRequest
from seckill.orders.record import OrderRecord
from seckill.personal import Address, Sealer, parse_address

_BODY_FIELDS = frozenset({"quantity", "sku_id", "address"})


class OrderRequest(NamedTuple):
    """An order POST body, validated for shape (before the activity is looked up).

    A NamedTuple, not a frozen dataclass: one is built per order POST, the storm's hot path,
    and a frozen dataclass pays an ``object.__setattr__`` per field.
    """

    quantity: int
    sku_id: str | None = None
    address: Address | None = None

    @classmethod
    def parse(cls, body: Any) -> OrderRequest:
        """InvalidRequest names the first bad field (never an address value)."""
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object")
        if not body.keys() <= _BODY_FIELDS:
            raise InvalidRequest(f"unknown field: {sorted(set(body) - _BODY_FIELDS)[0]}")
        if "quantity" not in body:
            raise InvalidRequest("missing field: quantity")
        quantity = body["quantity"]
        if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
            raise InvalidRequest("quantity must be a positive integer")
        sku_id = body.get("sku_id")
        if sku_id is not None and (not isinstance(sku_id, str) or not 1 <= len(sku_id) <= 64):
            raise InvalidRequest("sku_id must be a string of 1-64 characters")
        address = parse_address(body["address"]) if "address" in body else None
        return cls(quantity, sku_id, address)


# raw order bodies already parsed: a storm sends a handful of distinct ones ({"quantity": 1});
# only short ones without an address are kept (no personal data is cached)
_PARSED: dict[bytes, OrderRequest] = {}
_PARSED_MAX = 1024
_PARSED_BODY_MAX = 96


def order_request(raw: bytes) -> OrderRequest:
    """The order POST body ``raw`` parsed and validated; InvalidRequest as OrderRequest.parse."""
    order = _PARSED.get(raw)
    if order is not None:
        return order
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("body must be valid JSON") from None
    order = OrderRequest.parse(body)
    if order.address is None and len(raw) <= _PARSED_BODY_MAX:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[raw] = order
    return order


@dataclass(frozen=True, slots=True)
class OrderTerms:
    """The reserve script's extra arguments for one buyer (ARGV[14..21])."""

    sku_id: str
    starts_at_ms: int
    per_user_limit: int
    price_cents: int
    tier: str
    version: str
    # part of the idempotency fingerprint: "" for the single form, so its keys stay as they were
    fingerprint_sku: str = ""
    address_hash: str = ""
    seal: Callable[[str], str] | None = None  # order id -> the address sealed to that order

    def script_args(self, order_id: str) -> list[str | int]:
        """ARGV[14..21] for a candidate ``order_id`` (the address is bound to it)."""
        return [
            self.sku_id,
            self.starts_at_ms,
            self.per_user_limit,
            self.price_cents,
            self.tier,
            self.version,
            self.seal(order_id) if self.seal is not None else "",
            self.address_hash,
        ]


# (activity version, sku id asked for, effective tier) -> terms: the same few per sale, and
# building them per order POST was a measurable share of the sold-out path
_RESOLVED: dict[tuple[str, str | None, str], OrderTerms] = {}
_RESOLVED_MAX = 4096


def resolve(activity: Activity, order: OrderRequest, tier: str) -> OrderTerms:
    """The buyer's terms; InvalidRequest for an unknown or missing SKU, quantity or address."""
    listed_tier = tier if tier in activity.tiers else ""
    key = (activity.version, order.sku_id, listed_tier)
    terms = _RESOLVED.get(key)
    if terms is None:
        terms = _terms(activity, order.sku_id, listed_tier)
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[key] = terms
    if order.quantity > terms.per_user_limit:
        raise InvalidRequest(f"quantity must be at most {terms.per_user_limit}")
    if activity.requires_address and order.address is None:
        raise InvalidRequest("this activity ships: address is required")
    return terms


def _terms(activity: Activity, sku_id: str | None, tier: str) -> OrderTerms:
    sku = activity.sku(sku_id)
    terms = activity.terms(tier)
    return OrderTerms(
        sku_id=sku.sku_id,
        starts_at_ms=terms.starts_at_ms,
        per_user_limit=terms.per_user_limit,
        price_cents=sku.price_cents if terms.price_cents is None else terms.price_cents,
        tier=tier,
        version=activity.version,
        fingerprint_sku=sku.sku_id if activity.skus else "",
    )


def with_address(terms: OrderTerms, address: Address | None, sealer: Sealer | None) -> OrderTerms:
    """The terms carrying the address, sealed to whichever order id the script is given."""
    if address is None:
        return terms
    if sealer is None:
        # never stored in clear: without a data key this gateway takes no addresses at all
        raise InvalidRequest("this gateway accepts no address (no data key is configured)")
    return replace(
        terms,
        address_hash=sealer.hash(address),
        seal=lambda order_id: sealer.seal(address, order_id),
    )


def problems(
    activity: Activity,
    sku_stock: Mapping[bytes, bytes],
    counters: Mapping[str, int],
    available: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """(per-SKU figures, problems) from the SKU counters; both empty before SKUs existed.

    Per SKU: initial == on sale + held (reserved or paid) and nothing negative; in total: the
    SKUs' stock adds up to the activity's, on sale and held alike.
    """
    if not sku_stock:
        return [], []
    on_sale = {k.decode(): int(v) for k, v in sku_stock.items()}
    figures: list[dict[str, Any]] = []
    found: list[str] = []
    for sku in activity.all_skus():
        initial = counters.get(f"initial:{sku.sku_id}", sku.stock)
        left = on_sale.get(sku.sku_id, 0)
        held = counters.get(f"held:{sku.sku_id}", 0)
        figures.append(
            {
                "sku_id": sku.sku_id,
                "initial_stock": initial,
                "available": left,
                "held": held,
                "released": counters.get(f"released:{sku.sku_id}", 0),
            }
        )
        if initial != left + held or left < 0 or held < 0:
            found.append(f"sku {sku.sku_id}: initial {initial} != available {left} + held {held}")
    unknown = sorted(set(on_sale) - {s.sku_id for s in activity.all_skus()})
    if unknown:
        found.append(f"stock counters for unknown SKUs, e.g. {unknown[0]}")
    total_available = sum(f["available"] for f in figures)
    if total_available != available:
        found.append(f"skus: available {total_available} != the activity's {available}")
    total_held = sum(f["held"] for f in figures)
    live = counters.get("reserved", 0) + counters.get("paid", 0)
    if total_held != live:
        found.append(f"skus: held {total_held} != reserved + paid {live}")
    if sum(f["initial_stock"] for f in figures) != counters.get("initial_stock", activity.stock):
        found.append("skus: initial stocks do not add up to the activity's")
    return figures, found


def over_limit(
    activity: Activity, records: list[OrderRecord], live_by_user: Mapping[str, int]
) -> list[str]:
    """Users holding more than their limit (their tier's, as recorded on their orders)."""
    tier_of = {r.user_id: r.tier for r in records if r.tier}
    return sorted(
        user
        for user, quantity in live_by_user.items()
        if quantity > activity.terms(tier_of.get(user)).per_user_limit
    )
