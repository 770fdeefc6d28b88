"""PostgreSQL order store (asyncpg): the production record of orders."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
from asyncpg.exceptions._base import DataError as ClientDataError
from asyncpg.exceptions._base import InternalClientError

from seckill.orders import store as sql
from seckill.orders.record import OrderRecord
from seckill.orders.store import (
    Batch,
    EntryRejected,
    OrderStore,
    StoreUnavailable,
    WriteResult,
)

# What "the database is away" looks like through asyncpg, besides the SQLSTATEs below:
# the connection or the pool, never the data. InternalClientError is asyncpg's protocol
# state machine meeting a connection the server dropped mid-operation ("cannot switch to
# state 15; another operation (2) is in progress"): seen about once in 90 writes while an
# operator terminates the backends, and it once killed the writer of a test that did.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    InternalClientError,
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
)

# Only a data exception (22: bad value, out of range) or an integrity violation (23: a CHECK,
# NOT NULL) says "this entry is bad". Every other SQLSTATE says "not now": connection (08),
# rollback (40: serialization failure, deadlock), resources (53: disk full, too many
# connections), lock not available (55P03), operator intervention (57: statement timeout, admin
# shutdown), system (58), read-only transaction (25006, a failover or a maintenance switch) - and
# a schema or privilege error (42, 3F, 28) is a deployment problem that retrying outlives, never
# a reason to dead-letter every entry.
ENTRY_CLASSES = frozenset({"22", "23"})


def classify(exc: BaseException) -> Exception | None:
    """StoreUnavailable or EntryRejected for an error of asyncpg; None when it is neither."""
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state[:2] in ENTRY_CLASSES:
            return EntryRejected(f"{state}: {exc}")
        # a statement timeout may be the batch's size against the configured timeout
        return StoreUnavailable(f"{state}: {exc}", smaller_may_pass=state == "57014")
    if isinstance(exc, ClientDataError):
        # a value asyncpg could not encode (client side): that entry's data
        return EntryRejected(str(exc))
    if isinstance(exc, UNAVAILABLE):
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    return None


_MIGRATION_LOCK = 0x5EC_0001  # pg_advisory_xact_lock key: one migrator at a time


def _numbered(statement: str) -> str:
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", statement)


INSERT_ORDER = _numbered(sql.INSERT_ORDER)
UPDATE_FROM = _numbered(sql.UPDATE_FROM)
SELECT_STATUS = _numbered(sql.SELECT_STATUS)
INSERT_EVENT = _numbered(sql.INSERT_EVENT)
INSERT_PAYMENT = _numbered(sql.INSERT_PAYMENT)
SELECT_ORDER = _numbered(sql.SELECT_ORDER)
COUNT_ORDERS = _numbered(sql.COUNT_ORDERS)
SELECT_STATUSES = _numbered(sql.SELECT_STATUSES)
SELECT_EVENTS = _numbered(sql.SELECT_EVENTS)
SELECT_PAYMENTS = _numbered(sql.SELECT_PAYMENTS)
SELECT_ORDERS_OF = _numbered(sql.SELECT_ORDERS_OF)
SELECT_STATUSES_OF = "SELECT order_id, status FROM orders WHERE order_id = ANY($1)"
COUNT_WITH = (
    "SELECT COUNT(*), COUNT(*) FILTER (WHERE order_id = ANY($2)),"
    " COUNT(*) FILTER (WHERE created_at_ms > $3) FROM orders WHERE activity_id = $1"
)
UPSERT_REFUND = _numbered(sql.UPSERT_REFUND)
SELECT_REFUNDS = _numbered(sql.SELECT_REFUNDS)
SELECT_ADDRESSES = _numbered(sql.SELECT_ADDRESSES)
UPDATE_ADDRESS = _numbered(sql.UPDATE_ADDRESS)


class PostgresStore(OrderStore):
    def __init__(self, url: str, *, pool_size: int = 4, timeout_s: float = 5.0) -> None:
        self.url = url
        self._pool_size = pool_size
        self._timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None

    async def _acquire_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self.url,
                    min_size=1,
                    max_size=self._pool_size,
                    timeout=self._timeout_s,
                    command_timeout=self._timeout_s,
                )
            except Exception as exc:
                raise (classify(exc) or StoreUnavailable(repr(exc))) from exc
        return self._pool

    async def _run(self, work: Any) -> Any:
        pool = await self._acquire_pool()
        try:
            async with pool.acquire(timeout=self._timeout_s) as connection:
                return await work(connection)
        except Exception as exc:
            classified = classify(exc)
            if classified is None:
                raise
            raise classified from exc

    async def migrate(self) -> None:
        async def work(db: asyncpg.Connection) -> None:
            async with db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                )
                current = await db.fetchval("SELECT MAX(version) FROM schema_version") or 0
                for version, statements in enumerate(sql.SCHEMA, start=1):
                    if version > current:
                        for statement in statements:
                            await db.execute(statement)
                        await db.execute(
                            "INSERT INTO schema_version (version) VALUES ($1)", version
                        )

        await self._run(work)

    async def write(self, batch: Batch) -> WriteResult:
        async def work(db: asyncpg.Connection) -> WriteResult:
            result = WriteResult()
            async with db.transaction():
                if batch.created:
                    before = await db.fetchval(
                        "SELECT COUNT(*) FROM orders WHERE order_id = ANY($1)",
                        [o.order_id for o in batch.created],
                    )
                    await db.executemany(INSERT_ORDER, [sql.order_row(o) for o in batch.created])
                    await db.executemany(
                        INSERT_EVENT, [sql.creation_event(o) for o in batch.created]
                    )
                    result.inserted += len(batch.created) - int(before)
                for change in batch.transitions:
                    order = change.order
                    status = await db.execute(INSERT_ORDER, *sql.order_row(order))
                    result.inserted += status.endswith(" 1")
                    await db.execute(INSERT_EVENT, *sql.creation_event(order))
                    # FOR UPDATE: two writers redelivering the same change serialize here
                    await db.fetchval(SELECT_STATUS + " FOR UPDATE", order.order_id)
                    updated = await db.execute(
                        UPDATE_FROM,
                        change.to_state,
                        order.paid_at_ms,
                        order.order_id,
                        change.from_state,
                    )
                    current = await db.fetchval(SELECT_STATUS, order.order_id)
                    if current != change.to_state:
                        result.illegal.append(change)
                        continue
                    result.applied += updated.endswith(" 1")
                    await db.execute(
                        INSERT_EVENT,
                        order.order_id,
                        change.from_state,
                        change.to_state,
                        sql.CAUSES[change.to_state],
                        change.at_ms,
                    )
                if batch.payments:
                    await db.executemany(
                        INSERT_PAYMENT,
                        [
                            (p.event_id, p.order_id, p.amount_cents, p.result, p.at_ms)
                            for p in batch.payments
                        ],
                    )
                if batch.refunds:
                    await db.executemany(UPSERT_REFUND, [sql.refund_row(r) for r in batch.refunds])
            return result

        result: WriteResult = await self._run(work)
        return result

    async def order(self, order_id: str) -> OrderRecord | None:
        row = await self._run(lambda db: db.fetchrow(SELECT_ORDER, order_id))
        return sql.record_from_row(row) if row else None

    async def count(self, activity_id: str) -> int:
        return int(await self._run(lambda db: db.fetchval(COUNT_ORDERS, activity_id)))

    async def statuses(self, activity_id: str) -> dict[str, str]:
        rows = await self._run(lambda db: db.fetch(SELECT_STATUSES, activity_id))
        return {r[0]: r[1] for r in rows}

    async def history(self, order_id: str) -> list[tuple[str, str, str, int]]:
        rows = await self._run(lambda db: db.fetch(SELECT_EVENTS, order_id))
        return [tuple(r) for r in rows]

    async def payments(self, order_id: str) -> list[tuple[str, str]]:
        rows = await self._run(lambda db: db.fetch(SELECT_PAYMENTS, order_id))
        return [tuple(r) for r in rows]

    async def refunds(self, activity_id: str) -> list[tuple[str, str, int, str, int]]:
        rows = await self._run(lambda db: db.fetch(SELECT_REFUNDS, activity_id))
        return [(r[0], r[1], int(r[2]), r[3], int(r[4])) for r in rows]

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def orders_of(self, activity_id: str) -> list[OrderRecord]:
        rows = await self._run(lambda db: db.fetch(SELECT_ORDERS_OF, activity_id))
        return [sql.record_from_row(r) for r in rows]

    async def statuses_of(self, order_ids: list[str]) -> dict[str, str]:
        if not order_ids:
            return {}
        rows = await self._run(lambda db: db.fetch(SELECT_STATUSES_OF, order_ids))
        return {r[0]: r[1] for r in rows}

    async def count_with(
        self, activity_id: str, order_ids: list[str], after_ms: int
    ) -> tuple[int, int, int]:
        row = await self._run(lambda db: db.fetchrow(COUNT_WITH, activity_id, order_ids, after_ms))
        return int(row[0]), int(row[1]), int(row[2])

    async def addresses(self, after: str, skip_prefix: str, limit: int) -> list[tuple[str, str]]:
        rows = await self._run(
            lambda db: db.fetch(SELECT_ADDRESSES, after, len(skip_prefix), skip_prefix, limit)
        )
        return [(r[0], r[1]) for r in rows]

    async def replace_address(self, order_id: str, old: str, new: str, new_hash: str) -> bool:
        status = await self._run(
            lambda db: db.execute(UPDATE_ADDRESS, new, new_hash, order_id, old)
        )
        return bool(status.endswith(" 1"))
