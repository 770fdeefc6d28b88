"""The order store: where accepted orders become the record, behind one small interface.

PostgreSQL (asyncpg) in production, SQLite as the embedded default; both run the same SQL.
Every write is idempotent, so a batch delivered twice (a writer killed between commit and
XACK) changes nothing the second time:

- a created order is ``INSERT … ON CONFLICT DO NOTHING`` on its id;
- a transition carries the whole record after the change. It is inserted if the order is not
  there yet (another writer may still hold its creation), else applied only from the expected
  state; if the order ends in any other state the transition was illegal: refused and counted.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from seckill.orders.record import OrderRecord

LEGAL_TRANSITIONS = frozenset(
    {("reserved", "paid"), ("reserved", "cancelled"), ("reserved", "expired")}
)


class StoreUnavailable(Exception):
    """The database is away (unreachable, read-only, timed out, locked, deadlocked): retry later.

    Never the fault of the entries being written: the writer retries the same batch in memory
    and counts nothing against them. ``smaller_may_pass`` marks a refusal by size (a statement
    timeout): the writer may then retry the batch in halves, still counting nothing.
    """

    def __init__(self, message: str = "", *, smaller_may_pass: bool = False) -> None:
        super().__init__(message)
        self.smaller_may_pass = smaller_may_pass


class EntryRejected(Exception):
    """A healthy database refused the batch (a data or constraint error): some entry is bad.

    Each backend decides, once, which of its errors mean this and which mean StoreUnavailable.
    """


@dataclass(frozen=True, slots=True)
class Transition:
    order: OrderRecord  # the record after the change
    from_state: str
    to_state: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    event_id: str
    order_id: str
    amount_cents: int
    result: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class RefundEvent:
    """A refund's state after a change (refund_update.lua); newer versions replace older ones."""

    order_id: str
    activity_id: str
    provider: str
    transaction_id: str
    amount_cents: int
    status: str
    attempts: int
    out_refund_no: str
    refund_id: str
    reason: str
    created_at_ms: int
    updated_at_ms: int
    version: int


@dataclass(slots=True)
class Batch:
    created: list[OrderRecord] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    payments: list[PaymentEvent] = field(default_factory=list)
    refunds: list[RefundEvent] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.created) + len(self.transitions) + len(self.payments) + len(self.refunds)


@dataclass(slots=True)
class WriteResult:
    inserted: int = 0
    applied: int = 0
    illegal: list[Transition] = field(default_factory=list)


SCHEMA: list[list[str]] = [
    # version 1
    [
        """CREATE TABLE IF NOT EXISTS orders (
            order_id      TEXT PRIMARY KEY,
            activity_id   TEXT NOT NULL,
            user_id       TEXT NOT NULL,
            quantity      INTEGER NOT NULL CHECK (quantity > 0),
            status        TEXT NOT NULL
                          CHECK (status IN ('reserved', 'paid', 'cancelled', 'expired')),
            created_at_ms BIGINT NOT NULL,
            expires_at_ms BIGINT NOT NULL,
            paid_at_ms    BIGINT NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX IF NOT EXISTS orders_by_activity ON orders (activity_id, status)",
        """CREATE TABLE IF NOT EXISTS order_events (
            order_id   TEXT NOT NULL,
            from_state TEXT NOT NULL,
            to_state   TEXT NOT NULL,
            cause      TEXT NOT NULL,
            at_ms      BIGINT NOT NULL,
            PRIMARY KEY (order_id, to_state)
        )""",
        """CREATE TABLE IF NOT EXISTS payment_events (
            event_id     TEXT PRIMARY KEY,
            order_id     TEXT NOT NULL,
            amount_cents BIGINT NOT NULL,
            result       TEXT NOT NULL,
            at_ms        BIGINT NOT NULL
        )""",
    ],
    # version 2: what an order needs to ship. Rows from before keep sku_id "" and price -1
    # (the activity's price); the address is ciphertext only (seckill.personal).
    [
        "ALTER TABLE orders ADD COLUMN sku_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE orders ADD COLUMN price_cents BIGINT NOT NULL DEFAULT -1",
        "ALTER TABLE orders ADD COLUMN tier TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE orders ADD COLUMN address TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE orders ADD COLUMN address_hash TEXT NOT NULL DEFAULT ''",
    ],
    # version 3: refunds of payments that came back refund_required (WeChat Pay), one per order
    # (a provider takes money for one trade number at most once); the newest version wins
    [
        """CREATE TABLE IF NOT EXISTS refunds (
            order_id       TEXT PRIMARY KEY,
            activity_id    TEXT NOT NULL,
            provider       TEXT NOT NULL,
            transaction_id TEXT NOT NULL,
            amount_cents   BIGINT NOT NULL,
            status         TEXT NOT NULL
                           CHECK (status IN ('pending', 'processing', 'refunded', 'attention')),
            attempts       INTEGER NOT NULL,
            out_refund_no  TEXT NOT NULL,
            refund_id      TEXT NOT NULL,
            reason         TEXT NOT NULL,
            created_at_ms  BIGINT NOT NULL,
            updated_at_ms  BIGINT NOT NULL,
            version        INTEGER NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS refunds_by_activity ON refunds (activity_id, status)",
    ],
]

# Statements in "?" style; the PostgreSQL backend numbers them.
INSERT_ORDER = (
    "INSERT INTO orders (order_id, activity_id, user_id, quantity, status, created_at_ms,"
    " expires_at_ms, paid_at_ms, sku_id, price_cents, tier, address, address_hash)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (order_id) DO NOTHING"
)
UPDATE_FROM = "UPDATE orders SET status = ?, paid_at_ms = ? WHERE order_id = ? AND status = ?"
SELECT_STATUS = "SELECT status FROM orders WHERE order_id = ?"
INSERT_EVENT = (
    "INSERT INTO order_events (order_id, from_state, to_state, cause, at_ms)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (order_id, to_state) DO NOTHING"
)
INSERT_PAYMENT = (
    "INSERT INTO payment_events (event_id, order_id, amount_cents, result, at_ms)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)
SELECT_ORDER = (
    "SELECT order_id, activity_id, user_id, quantity, status, created_at_ms, expires_at_ms,"
    " paid_at_ms, sku_id, price_cents, tier, address, address_hash FROM orders WHERE order_id = ?"
)
# key rotation: addressed orders not yet under the current key, by order id (the cursor), and a
# compare-and-set on the old ciphertext (a row changed meanwhile is left for the next pass)
SELECT_ADDRESSES = (
    "SELECT order_id, address FROM orders WHERE order_id > ? AND address <> ''"
    " AND substr(address, 1, ?) <> ? ORDER BY order_id LIMIT ?"
)
UPDATE_ADDRESS = (
    "UPDATE orders SET address = ?, address_hash = ? WHERE order_id = ? AND address = ?"
)
COUNT_ORDERS = "SELECT COUNT(*) FROM orders WHERE activity_id = ?"
SELECT_STATUSES = "SELECT order_id, status FROM orders WHERE activity_id = ?"
SELECT_EVENTS = (
    "SELECT from_state, to_state, cause, at_ms FROM order_events WHERE order_id = ? ORDER BY at_ms"
)
SELECT_PAYMENTS = "SELECT event_id, result FROM payment_events WHERE order_id = ? ORDER BY at_ms"
SELECT_ORDERS_OF = (
    "SELECT order_id, activity_id, user_id, quantity, status, created_at_ms, expires_at_ms,"
    " paid_at_ms, sku_id, price_cents, tier, address, address_hash FROM orders"
    " WHERE activity_id = ?"
)

UPSERT_REFUND = (
    "INSERT INTO refunds (order_id, activity_id, provider, transaction_id, amount_cents, status,"
    " attempts, out_refund_no, refund_id, reason, created_at_ms, updated_at_ms, version)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (order_id) DO UPDATE SET"
    " status = excluded.status, attempts = excluded.attempts,"
    " out_refund_no = excluded.out_refund_no, refund_id = excluded.refund_id,"
    " reason = excluded.reason, updated_at_ms = excluded.updated_at_ms,"
    " version = excluded.version WHERE refunds.version < excluded.version"
)
SELECT_REFUNDS = (
    "SELECT order_id, status, attempts, out_refund_no, amount_cents FROM refunds"
    " WHERE activity_id = ? ORDER BY created_at_ms, order_id"
)

CAUSES = {"paid": "payment", "cancelled": "cancel", "expired": "expiry"}


def order_row(order: OrderRecord) -> tuple[Any, ...]:
    """INSERT_ORDER parameters."""
    return (
        order.order_id,
        order.activity_id,
        order.user_id,
        order.quantity,
        order.status,
        order.created_at_ms,
        order.expires_at_ms,
        order.paid_at_ms,
        order.sku_id,
        order.price_cents,
        order.tier,
        order.address,
        order.address_hash,
    )


def refund_row(refund: RefundEvent) -> tuple[Any, ...]:
    """UPSERT_REFUND parameters."""
    return (
        refund.order_id,
        refund.activity_id,
        refund.provider,
        refund.transaction_id,
        refund.amount_cents,
        refund.status,
        refund.attempts,
        refund.out_refund_no,
        refund.refund_id,
        refund.reason,
        refund.created_at_ms,
        refund.updated_at_ms,
        refund.version,
    )


def creation_event(order: OrderRecord) -> tuple[Any, ...]:
    """INSERT_EVENT parameters of an order's creation."""
    return (order.order_id, "new", "reserved", "purchase", order.created_at_ms)


def record_from_row(row: Any) -> OrderRecord:
    return OrderRecord(
        order_id=row[0],
        activity_id=row[1],
        user_id=row[2],
        quantity=int(row[3]),
        status=row[4],
        created_at_ms=int(row[5]),
        expires_at_ms=int(row[6]),
        paid_at_ms=int(row[7] or 0),
        sku_id=row[8] or "",
        price_cents=int(row[9]),
        tier=row[10] or "",
        address=row[11] or "",
        address_hash=row[12] or "",
    )


class OrderStore(abc.ABC):
    """Where orders are the record."""

    @abc.abstractmethod
    async def migrate(self) -> None:
        """Create or upgrade the schema."""

    @abc.abstractmethod
    async def write(self, batch: Batch) -> WriteResult:
        """Apply one batch in one transaction.

        StoreUnavailable when the database is away, EntryRejected when it refused the data.
        """

    @abc.abstractmethod
    async def order(self, order_id: str) -> OrderRecord | None:
        """One order, or None."""

    @abc.abstractmethod
    async def count(self, activity_id: str) -> int:
        """How many orders of the activity are stored."""

    @abc.abstractmethod
    async def statuses(self, activity_id: str) -> dict[str, str]:
        """Order id -> status for every stored order of the activity."""

    @abc.abstractmethod
    async def history(self, order_id: str) -> list[tuple[str, str, str, int]]:
        """(from, to, cause, at_ms) of every transition of the order, oldest first."""

    @abc.abstractmethod
    async def payments(self, order_id: str) -> list[tuple[str, str]]:
        """(event_id, result) of every payment callback recorded for the order."""

    @abc.abstractmethod
    async def refunds(self, activity_id: str) -> list[tuple[str, str, int, str, int]]:
        """(order_id, status, attempts, out_refund_no, amount_cents) of the activity's refunds."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abc.abstractmethod
    async def orders_of(self, activity_id: str) -> list[OrderRecord]:
        """Every stored order of the activity, read in one statement (the report's reading)."""

    @abc.abstractmethod
    async def statuses_of(self, order_ids: list[str]) -> dict[str, str]:
        """Order id -> status of those of ``order_ids`` the store holds (one query per chunk)."""

    @abc.abstractmethod
    async def count_with(
        self, activity_id: str, order_ids: list[str], after_ms: int
    ) -> tuple[int, int, int]:
        """Stored orders of the activity, how many of ``order_ids`` are among them, and how many
        were created after ``after_ms``: one read."""

    @abc.abstractmethod
    async def addresses(self, after: str, skip_prefix: str, limit: int) -> list[tuple[str, str]]:
        """(order_id, address) of addressed orders after ``after`` not starting ``skip_prefix``."""

    @abc.abstractmethod
    async def replace_address(self, order_id: str, old: str, new: str, new_hash: str) -> bool:
        """Set the order's address to ``new`` only if it is still ``old``; True if it was."""


def open_store(url: str) -> OrderStore:
    """The store a database URL names (postgresql://… or sqlite:///path)."""
    scheme = urlparse(url).scheme
    if scheme in {"postgresql", "postgres"}:
        from seckill.orders.postgres import PostgresStore

        return PostgresStore(url)
    if scheme == "sqlite":
        from seckill.orders.sqlite import SqliteStore

        return SqliteStore(_sqlite_path(url))
    raise ValueError(f"unsupported database URL: {url!r}")


def _sqlite_path(url: str) -> str:
    # sqlite:///relative/path and sqlite:////absolute/path, as SQLAlchemy spells them
    rest = url[len("sqlite://") :]
    return rest[1:] if rest.startswith("/") else rest
