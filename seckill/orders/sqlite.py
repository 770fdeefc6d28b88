"""SQLite order store: the embedded default. One connection in one worker thread.

Each batch crosses to the thread once and commits once. WAL lets readers (the gateway's report
and order lookups) work beside the writer; ``synchronous=FULL`` because an acknowledged stream
entry has nowhere else to come back from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from seckill.orders import store as sql
from seckill.orders.record import OrderRecord
from seckill.orders.store import (
    Batch,
    EntryRejected,
    OrderStore,
    StoreUnavailable,
    WriteResult,
)

T = TypeVar("T")


def classify(exc: BaseException) -> Exception | None:
    """StoreUnavailable or EntryRejected for an error of sqlite3; None when it is neither."""
    if isinstance(exc, sqlite3.OperationalError):
        # busy, locked, disk I/O, disk full, read-only file, cannot open: the file, not the data
        return StoreUnavailable(str(exc))
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError)):
        return EntryRejected(str(exc))
    if isinstance(exc, sqlite3.DatabaseError):
        # corruption and friends: not an entry's fault, and retrying is the only safe answer
        return StoreUnavailable(str(exc))
    if isinstance(exc, OSError):
        return StoreUnavailable(str(exc))
    return None


class SqliteStore(OrderStore):
    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA busy_timeout=5000")
            self._local.connection = connection
        return connection

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            connection = self._connection()
            try:
                return work(connection)
            except BaseException as exc:
                if connection.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
                classified = classify(exc)
                if classified is None:
                    raise
                raise classified from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def migrate(self) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for version, statements in enumerate(sql.SCHEMA, start=1):
                if version > current:
                    for statement in statements:
                        db.execute(statement)
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            db.execute("COMMIT")

        await self._run(work)

    async def write(self, batch: Batch) -> WriteResult:
        def work(db: sqlite3.Connection) -> WriteResult:
            result = WriteResult()
            db.execute("BEGIN IMMEDIATE")
            for order in batch.created:
                result.inserted += db.execute(sql.INSERT_ORDER, sql.order_row(order)).rowcount
                db.execute(sql.INSERT_EVENT, sql.creation_event(order))
            for change in batch.transitions:
                order = change.order
                result.inserted += db.execute(sql.INSERT_ORDER, sql.order_row(order)).rowcount
                db.execute(sql.INSERT_EVENT, sql.creation_event(order))
                updated = db.execute(
                    sql.UPDATE_FROM,
                    (change.to_state, order.paid_at_ms, order.order_id, change.from_state),
                ).rowcount
                status = db.execute(sql.SELECT_STATUS, (order.order_id,)).fetchone()[0]
                if status != change.to_state:
                    result.illegal.append(change)
                    continue
                result.applied += updated
                db.execute(
                    sql.INSERT_EVENT,
                    (
                        order.order_id,
                        change.from_state,
                        change.to_state,
                        sql.CAUSES[change.to_state],
                        change.at_ms,
                    ),
                )
            for payment in batch.payments:
                db.execute(
                    sql.INSERT_PAYMENT,
                    (
                        payment.event_id,
                        payment.order_id,
                        payment.amount_cents,
                        payment.result,
                        payment.at_ms,
                    ),
                )
            for refund in batch.refunds:
                db.execute(sql.UPSERT_REFUND, sql.refund_row(refund))
            db.execute("COMMIT")
            return result

        return await self._run(work)

    async def _query(self, statement: str, params: tuple[Any, ...]) -> list[Any]:
        return await self._run(lambda db: db.execute(statement, params).fetchall())

    async def order(self, order_id: str) -> OrderRecord | None:
        rows = await self._query(sql.SELECT_ORDER, (order_id,))
        return sql.record_from_row(rows[0]) if rows else None

    async def count(self, activity_id: str) -> int:
        rows = await self._query(sql.COUNT_ORDERS, (activity_id,))
        return int(rows[0][0])

    async def statuses(self, activity_id: str) -> dict[str, str]:
        return dict(await self._query(sql.SELECT_STATUSES, (activity_id,)))

    async def history(self, order_id: str) -> list[tuple[str, str, str, int]]:
        return [tuple(r) for r in await self._query(sql.SELECT_EVENTS, (order_id,))]

    async def payments(self, order_id: str) -> list[tuple[str, str]]:
        return [tuple(r) for r in await self._query(sql.SELECT_PAYMENTS, (order_id,))]

    async def refunds(self, activity_id: str) -> list[tuple[str, str, int, str, int]]:
        rows = await self._query(sql.SELECT_REFUNDS, (activity_id,))
        return [(r[0], r[1], int(r[2]), r[3], int(r[4])) for r in rows]

    async def close(self) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.close()
            self._local.connection = None

        if getattr(self, "_executor", None) is not None:
            try:
                await self._run(work)
            finally:
                self._executor.shutdown(wait=False)

    async def orders_of(self, activity_id: str) -> list[OrderRecord]:
        rows = await self._query(sql.SELECT_ORDERS_OF, (activity_id,))
        return [sql.record_from_row(r) for r in rows]

    async def statuses_of(self, order_ids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(order_ids), 500):  # under SQLite's bound-variable limit
            chunk = order_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            statement = f"SELECT order_id, status FROM orders WHERE order_id IN ({marks})"
            found.update(dict(await self._query(statement, tuple(chunk))))
        return found

    async def count_with(
        self, activity_id: str, order_ids: list[str], after_ms: int
    ) -> tuple[int, int, int]:
        statement = (
            "SELECT COUNT(*), COALESCE(SUM(order_id IN (SELECT value FROM json_each(?))), 0),"
            " COALESCE(SUM(created_at_ms > ?), 0) FROM orders WHERE activity_id = ?"
        )
        rows = await self._query(statement, (json.dumps(order_ids), after_ms, activity_id))
        return int(rows[0][0]), int(rows[0][1]), int(rows[0][2])

    async def addresses(self, after: str, skip_prefix: str, limit: int) -> list[tuple[str, str]]:
        rows = await self._query(
            sql.SELECT_ADDRESSES, (after, len(skip_prefix), skip_prefix, limit)
        )
        return [(r[0], r[1]) for r in rows]

    async def replace_address(self, order_id: str, old: str, new: str, new_hash: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            updated = db.execute(sql.UPDATE_ADDRESS, (new, new_hash, order_id, old)).rowcount
            return bool(updated)

        return await self._run(work)
