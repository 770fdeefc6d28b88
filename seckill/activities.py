"""The activity: one flash sale of one or more SKUs, and the validation of its admin definition."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
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
# the single form's SKU fields; the list form replaces them with "skus"
_SINGLE = ("sku_id", "price_cents", "stock")
_OPTIONAL = (
    "skus",
    "tiers",
    "requires_address",
    "registration_opens_at",
    "admission",
    "claim_window_s",
    "buckets",
)
_SKU_FIELDS = ("sku_id", "title", "price_cents", "stock")
_TIER_FIELDS = ("starts_at", "per_user_limit", "price_cents")
_TIER_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_SKUS = 100
ADMISSIONS = ("fcfs", "lottery")
DEFAULT_CLAIM_WINDOW_S = 60
# a hot item's stock split over at most this many buckets (key spaces in as many slots)
MAX_BUCKETS = 16


@dataclass(frozen=True, slots=True)
class Sku:
    """One sellable variant: its own stock and price."""

    sku_id: str
    title: str
    price_cents: int
    stock: int

    def public(self, stock_left: int) -> dict[str, Any]:
        """The SKU as the activity GET shows it."""
        return {
            "sku_id": self.sku_id,
            "title": self.title,
            "price_cents": self.price_cents,
            "stock_left": max(stock_left, 0),
        }


@dataclass(frozen=True, slots=True)
class Tier:
    """A member tier's terms; None: the activity's default for that term."""

    starts_at_ms: int | None = None
    per_user_limit: int | None = None
    price_cents: int | None = None


@dataclass(frozen=True, slots=True)
class Terms:
    """What one buyer gets: when the window opens for them, their limit, their price."""

    starts_at_ms: int
    per_user_limit: int
    price_cents: int | None  # None: each SKU's own price


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
    # () for the single form (sku_id/price_cents/stock above); else every SKU, in order
    skus: tuple[Sku, ...] = ()
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    requires_address: bool = False
    # a fair sale: only users who registered in [registration_opens_at, starts_at) may buy;
    # "lottery" admits them in the drawn order, each with claim_window_s to buy
    registration_opens_at_ms: int | None = None
    admission: str = "fcfs"
    claim_window_s: int | None = None
    # > 1: the stock is split over this many buckets, each in a slot of its own (buckets.py)
    buckets: int = 1
    _version: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # computed once: every order passes it to the reserve script
        # the fair fields enter only when set: an fcfs activity keeps the digest it had before
        text = json.dumps([*self._definition(), *self._extra()], separators=(",", ":"))
        object.__setattr__(self, "_version", hashlib.sha256(text.encode()).hexdigest()[:16])

    @classmethod
    def from_request(cls, body: Any) -> Activity:
        """Validate an admin POST body; InvalidRequest names the first bad field."""
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object")
        unknown = sorted(set(body) - set(_FIELDS) - set(_OPTIONAL))
        if unknown:
            raise InvalidRequest(f"unknown field: {unknown[0]}")
        listed = "skus" in body
        if listed and any(f in body for f in _SINGLE):
            raise InvalidRequest("give either skus or sku_id/price_cents/stock, not both")
        missing = [f for f in _FIELDS if f not in body and not (listed and f in _SINGLE)]
        if missing:
            raise InvalidRequest(f"missing field: {missing[0]}")
        activity_id = _text(body, "id", 64)
        if not keys.ID_PATTERN.fullmatch(activity_id):
            raise InvalidRequest("id must be 1-64 characters of [A-Za-z0-9_-]")
        starts_at_ms = _time(body, "starts_at")
        ends_at_ms = _time(body, "ends_at")
        if ends_at_ms <= starts_at_ms:
            raise InvalidRequest("ends_at must be after starts_at")
        skus = _skus(body["skus"]) if listed else ()
        if skus:
            single = Sku(skus[0].sku_id, "", min(s.price_cents for s in skus), 0)
            single_stock = sum(s.stock for s in skus)
        else:
            single = Sku(_text(body, "sku_id", 64), "", _int(body, "price_cents", 0, 10**12), 0)
            single_stock = _int(body, "stock", 0, 10_000_000)
        requires_address = body.get("requires_address", False)
        if not isinstance(requires_address, bool):
            raise InvalidRequest("requires_address must be true or false")
        tiers = _tiers(body.get("tiers", {}), ends_at_ms)
        opens, admission, claim_window_s = _fair(body, starts_at_ms, tiers)
        buckets = _buckets(body, single_stock, skus, opens)
        return cls(
            id=activity_id,
            sku_id=single.sku_id,
            title=_text(body, "title", 200),
            price_cents=single.price_cents,
            stock=single_stock,
            per_user_limit=_int(body, "per_user_limit", 1, 1000),
            starts_at_ms=starts_at_ms,
            ends_at_ms=ends_at_ms,
            payment_timeout_s=_int(body, "payment_timeout_s", 1, 86_400),
            skus=skus,
            tiers=tiers,
            requires_address=requires_address,
            registration_opens_at_ms=opens,
            admission=admission,
            claim_window_s=claim_window_s,
            buckets=buckets,
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
            # absent in definitions written before SKUs and tiers: the single form
            skus=tuple(Sku(*s) for s in json.loads(meta.get(b"skus") or b"[]")),
            tiers={
                name: Tier(*terms)
                for name, terms in json.loads(meta.get(b"tiers") or b"{}").items()
            },
            requires_address=meta.get(b"requires_address") == b"1",
            registration_opens_at_ms=_optional_int(meta.get(b"registration_opens_at_ms")),
            admission=(meta.get(b"admission") or b"fcfs").decode(),
            claim_window_s=_optional_int(meta.get(b"claim_window_s")),
            buckets=int(meta.get(b"buckets") or 1),
        )

    def all_skus(self) -> tuple[Sku, ...]:
        """Every SKU on sale (the single form is one SKU)."""
        return self.skus or (Sku(self.sku_id, self.title, self.price_cents, self.stock),)

    def sku(self, sku_id: str | None) -> Sku:
        """The SKU an order names; InvalidRequest when unknown, or missing where required."""
        skus = self.all_skus()
        if sku_id is None:
            if len(skus) > 1:
                raise InvalidRequest("sku_id is required: this activity sells several SKUs")
            return skus[0]
        for sku in skus:
            if sku.sku_id == sku_id:
                return sku
        raise InvalidRequest("sku_id names no SKU of this activity")

    def terms(self, tier: str | None) -> Terms:
        """The buyer's window start, limit and price; an unlisted tier gets the defaults."""
        listed = self.tiers.get(tier) if tier else None
        if listed is None:
            return Terms(self.starts_at_ms, self.per_user_limit, None)
        return Terms(
            self.starts_at_ms if listed.starts_at_ms is None else listed.starts_at_ms,
            self.per_user_limit if listed.per_user_limit is None else listed.per_user_limit,
            listed.price_cents,
        )

    @property
    def opens_at_ms(self) -> int:
        """The earliest moment anyone may buy (a tier's early access included)."""
        starts = [t.starts_at_ms for t in self.tiers.values() if t.starts_at_ms is not None]
        return min([self.starts_at_ms, *starts])

    @property
    def version(self) -> str:
        """A digest of the definition: the reserve script refuses terms from another one."""
        return self._version

    @property
    def registration(self) -> bool:
        """True when only registered users may buy."""
        return self.registration_opens_at_ms is not None

    @property
    def lottery(self) -> bool:
        """True when registrants are admitted in a drawn order, in turns."""
        return self.admission == "lottery"

    def bucket_stock(self, index: int) -> int:
        """Bucket ``index``'s share of the stock at the start: as even as it gets."""
        share, rest = divmod(self.stock, self.buckets)
        return share + (1 if index < rest else 0)

    def script_args(self, seed: str = "", commitment: str = "", bucket: int = 0) -> list[str | int]:
        """ARGV of create_activity.lua (``seed``: a lottery's, kept only if none is stored;
        ``bucket``: which bucket's key space of a bucketed activity)."""
        stocks: list[str | int] = []
        fair = self._extra()
        if self.buckets > 1:
            # one counter per bucket, no SKU counter: a bucketed activity sells on the total
            fair += ["bucket", bucket, "bucket_stock", self.bucket_stock(bucket)]
        else:
            for sku in self.all_skus():
                stocks += [sku.sku_id, sku.stock]
        return [
            *self._definition(),
            self.version,
            self.opens_at_ms,
            seed,
            commitment,
            len(fair) // 2,
            *fair,
            *stocks,
        ]

    def _extra(self) -> list[str | int]:
        """The optional meta fields as (name, value) pairs: a fair sale's, the bucket count.

        They enter the version only when set: an activity without them keeps its digest.
        """
        buckets: list[str | int] = ["buckets", self.buckets] if self.buckets > 1 else []
        return self._fair() + buckets

    def _fair(self) -> list[str | int]:
        """The fair sale's meta fields as (name, value) pairs; empty for a plain sale."""
        if self.registration_opens_at_ms is None:
            return []
        fair: list[str | int] = [
            "registration_opens_at_ms",
            self.registration_opens_at_ms,
            "admission",
            self.admission,
        ]
        if self.claim_window_s is not None:
            fair += ["claim_window_s", self.claim_window_s]
        return fair

    def _definition(self) -> list[str | int]:
        skus_json = json.dumps(
            [[s.sku_id, s.title, s.price_cents, s.stock] for s in self.skus], separators=(",", ":")
        )
        tiers_json = json.dumps(
            {n: [t.starts_at_ms, t.per_user_limit, t.price_cents] for n, t in self.tiers.items()},
            separators=(",", ":"),
            sort_keys=True,
        )
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
            skus_json,
            tiers_json,
            "1" if self.requires_address else "0",
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

    def public(
        self,
        now_ms: int,
        stock_left: int,
        paused: bool = False,
        sku_left: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """Body of GET /api/v1/activities/{id} (the single form exactly as before SKUs)."""
        body = {
            "id": self.id,
            "sku_id": self.sku_id,
            "title": self.title,
            "price_cents": self.price_cents,
            "starts_at": clock.to_rfc3339(self.starts_at_ms),
            "ends_at": clock.to_rfc3339(self.ends_at_ms),
            "state": self.state(now_ms, stock_left, paused),
            "stock_left": max(stock_left, 0),
        }
        if self.skus:
            left = sku_left or {}
            body["skus"] = [s.public(left.get(s.sku_id, s.stock)) for s in self.skus]
        if self.tiers:
            body["tiers"] = {
                name: {
                    "starts_at": clock.to_rfc3339(terms.starts_at_ms),
                    "per_user_limit": terms.per_user_limit,
                    "price_cents": terms.price_cents,
                }
                for name in sorted(self.tiers)
                for terms in [self.terms(name)]
            }
        if self.requires_address:
            body["requires_address"] = True
        if self.registration_opens_at_ms is not None:
            body["registration_opens_at"] = clock.to_rfc3339(self.registration_opens_at_ms)
            body["admission"] = self.admission
            if self.claim_window_s is not None:
                body["claim_window_s"] = self.claim_window_s
        return body

    def admin(
        self,
        now_ms: int,
        stock_left: int,
        paused: bool = False,
        sku_left: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """Body of the admin create answer: the definition plus the live state."""
        body = {
            **self.public(now_ms, stock_left, paused, sku_left),
            "stock": self.stock,
            "per_user_limit": self.per_user_limit,
            "payment_timeout_s": self.payment_timeout_s,
        }
        if self.buckets > 1:
            body["buckets"] = self.buckets
        return body


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


def _skus(value: Any) -> tuple[Sku, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SKUS:
        raise InvalidRequest(f"skus must be a list of 1-{MAX_SKUS} SKUs")
    skus: list[Sku] = []
    for item in value:
        if not isinstance(item, dict):
            raise InvalidRequest("each SKU must be a JSON object")
        unknown = sorted(set(item) - set(_SKU_FIELDS))
        if unknown:
            raise InvalidRequest(f"unknown SKU field: {unknown[0]}")
        missing = [f for f in _SKU_FIELDS if f not in item]
        if missing:
            raise InvalidRequest(f"missing SKU field: {missing[0]}")
        sku_id = _text(item, "sku_id", 64)
        if not keys.ID_PATTERN.fullmatch(sku_id):
            # SKU ids name Redis hash fields and counters: keep them plain
            raise InvalidRequest("sku_id must be 1-64 characters of [A-Za-z0-9_-]")
        skus.append(
            Sku(
                sku_id,
                _text(item, "title", 200),
                _int(item, "price_cents", 0, 10**12),
                _int(item, "stock", 0, 10_000_000),
            )
        )
    if len({s.sku_id for s in skus}) != len(skus):
        raise InvalidRequest("sku_id values must be distinct")
    return tuple(skus)


def _tiers(value: Any, ends_at_ms: int) -> dict[str, Tier]:
    if not isinstance(value, dict) or len(value) > 20:
        raise InvalidRequest("tiers must be an object of at most 20 tiers")
    tiers: dict[str, Tier] = {}
    for name, terms in value.items():
        if not _TIER_NAME.fullmatch(name):
            raise InvalidRequest("a tier name must be 1-32 characters of [A-Za-z0-9_-]")
        if not isinstance(terms, dict):
            raise InvalidRequest("each tier must be a JSON object")
        unknown = sorted(set(terms) - set(_TIER_FIELDS))
        if unknown:
            raise InvalidRequest(f"unknown tier field: {unknown[0]}")
        starts = _time(terms, "starts_at") if "starts_at" in terms else None
        if starts is not None and starts >= ends_at_ms:
            raise InvalidRequest("a tier's starts_at must be before ends_at")
        tiers[name] = Tier(
            starts,
            _int(terms, "per_user_limit", 1, 1000) if "per_user_limit" in terms else None,
            _int(terms, "price_cents", 0, 10**12) if "price_cents" in terms else None,
        )
    return tiers


def _optional_int(raw: bytes | None) -> int | None:
    return int(raw) if raw else None


def _fair(
    body: dict[str, Any], starts_at_ms: int, tiers: Mapping[str, Tier]
) -> tuple[int | None, str, int | None]:
    """(registration_opens_at_ms, admission, claim_window_s) of an admin body, validated."""
    opens = _time(body, "registration_opens_at") if "registration_opens_at" in body else None
    if opens is not None and opens >= starts_at_ms:
        raise InvalidRequest("registration_opens_at must be before starts_at")
    admission = body.get("admission", "fcfs")
    if admission not in ADMISSIONS:
        raise InvalidRequest('admission must be "fcfs" or "lottery"')
    if admission == "fcfs":
        if "claim_window_s" in body:
            raise InvalidRequest('claim_window_s applies to admission "lottery" only')
        return opens, admission, None
    if opens is None:
        raise InvalidRequest('admission "lottery" needs registration_opens_at')
    if any(t.starts_at_ms is not None and t.starts_at_ms != starts_at_ms for t in tiers.values()):
        # the draw happens at starts_at: nobody can be admitted before it
        raise InvalidRequest('admission "lottery" allows no tier starts_at other than starts_at')
    claim_window_s = (
        _int(body, "claim_window_s", 1, 86_400)
        if "claim_window_s" in body
        else DEFAULT_CLAIM_WINDOW_S
    )
    return opens, admission, claim_window_s


def _buckets(body: dict[str, Any], stock: int, skus: tuple[Sku, ...], opens: int | None) -> int:
    """The bucket count of an admin body (1: the stock in one key space, as without it)."""
    if "buckets" not in body:
        return 1
    buckets = _int(body, "buckets", 1, MAX_BUCKETS)
    if buckets == 1:
        return 1
    if buckets > stock:
        raise InvalidRequest("buckets must be at most stock: every bucket starts with a unit")
    if skus:
        # each SKU's counter would have to move between buckets too; one SKU is the hot case
        raise InvalidRequest("buckets apply to a single-SKU activity (sku_id/stock), not skus")
    if opens is not None:
        # turns admit users against one stock counter in one step; split, they could not
        raise InvalidRequest("buckets cannot be combined with registration_opens_at")
    return buckets
