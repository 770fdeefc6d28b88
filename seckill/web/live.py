"""The ops console's live snapshot: one a second, shared by every console watching.

Nothing here runs on the purchase or sold-out paths. The snapshot loop starts with the first
viewer and stops with the last: while nobody watches, it costs nothing at all. Each reading
reuses what already exists (the report, shallow: counts only; the request counters of
metrics.py, diffed; the breakers; the flag cache; the writers' heartbeats), so a console shows
the same truth as /metrics, /readyz and `seckill reconcile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from seckill import buckets, clock, keys, report
from seckill.activities import Activity
from seckill.orders.store import StoreUnavailable
from seckill.orders.streams import oldest_waiting_ms
from seckill.scripts import CONNECTION_ERRORS
from seckill.web.state import Services

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
# reports per snapshot: the live sales first, then the next to start, then the latest ended
MAX_ACTIVITIES = 12
# a reading that takes longer is given up: the console says Redis is slow or down
READING_BUDGET_S = 3.0
AUDIT_ENTRIES = 10

Totals = dict[tuple[str, str], float]


def _frame(snapshot: dict[str, Any]) -> bytes:
    """One Server-Sent Events message."""
    return b"event: snapshot\ndata: " + json.dumps(snapshot).encode() + b"\n\n"


class Viewer:
    """One connected console: it gets the latest frame, never a growing backlog."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self._frames: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)

    def offer(self, frame: bytes) -> None:
        """Keep only the newest frame for a viewer slower than one a second."""
        if self._frames.full():
            self._frames.get_nowait()
        self._frames.put_nowait(frame)

    async def next(self, timeout_s: float) -> bytes | None:
        """The next frame, or None when none came within ``timeout_s``."""
        try:
            return await asyncio.wait_for(self._frames.get(), timeout_s)
        except TimeoutError:
            return None

    def close(self) -> None:
        self._live.leave(self)


class Live:
    def __init__(self, services: Services) -> None:
        self._services = services
        self._viewers: set[Viewer] = set()
        self._task: asyncio.Task[None] | None = None
        self._latest: tuple[float, bytes] | None = None
        self._previous: tuple[float, Totals] | None = None
        self._loop_lag_ms = 0.0
        self._closed = False
        self.snapshots = 0  # taken since start: one a second while watched, whoever watches
        self._failing = 0

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    @property
    def running(self) -> bool:
        """True while the snapshot loop runs (only while a console watches)."""
        return self._task is not None and not self._task.done()

    def watch(self) -> Viewer:
        """A new viewer; starts the snapshot loop if it is not running."""
        viewer = Viewer(self)
        self._viewers.add(viewer)
        latest = self._latest
        if latest is not None and time.monotonic() - latest[0] < 1.5 * INTERVAL_S:
            viewer.offer(latest[1])  # a fresh one: no wait for the next second
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run())
        return viewer

    def leave(self, viewer: Viewer) -> None:
        self._viewers.discard(viewer)

    async def close(self) -> None:
        """Stop the loop (application shutdown)."""
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._viewers and not self._closed:
            started = loop.time()
            try:
                frame = _frame(await self.take())
                self._failing = 0
            except Exception:  # a console must never stop updating over one bad reading
                self._failing += 1
                if self._failing == 1:  # the first in full, the repeats as a count
                    log.exception("console snapshot failed")
                elif self._failing % 60 == 0:
                    log.warning("console snapshots failing: %d in a row", self._failing)
                frame = _frame({"at": clock.to_rfc3339(clock.now_ms()), "error": "snapshot failed"})
            self._latest = (time.monotonic(), frame)
            for viewer in list(self._viewers):
                viewer.offer(frame)
            pause = max(0.0, INTERVAL_S - (loop.time() - started))
            woke_due = loop.time() + pause
            await asyncio.sleep(pause)
            # how late the event loop woke us: a loop blocked by something shows here
            self._loop_lag_ms = max(0.0, (loop.time() - woke_due) * 1000)

    async def take(self) -> dict[str, Any]:
        """One snapshot of the whole sale as this gateway sees it."""
        self.snapshots += 1
        services = self._services
        switches = services.switches
        flags = switches.all()
        body: dict[str, Any] = {
            "at": clock.to_rfc3339(clock.now_ms()),
            "gateway": {
                "pid": os.getpid(),
                "in_flight": services.in_flight,
                "shed": services.shed,
                "draining": services.draining,
                "loop_lag_ms": round(self._loop_lag_ms, 1),
                "consoles": self.viewers,
            },
            "sale": {"enabled": flags.get("seckill.enabled") is not False},
            "flags": flags,
            "flag_expiries": switches.expiries(),
            "breakers": [{"name": b.name, "state": b.state} for b in services.breakers],
            "requests": self._rates(),
            "loops": services.loops() if services.loops is not None else {},
        }
        try:
            async with asyncio.timeout(READING_BUDGET_S):
                body.update(await self._from_redis())
            body["redis"] = {"up": True, "error": None}
        except CONNECTION_ERRORS as exc:  # a timeout among them
            body["redis"] = {"up": False, "error": f"Redis unreachable ({type(exc).__name__})"}
        return body

    def _rates(self) -> dict[str, Any]:
        """Requests per second by endpoint and outcome since the previous snapshot."""
        now, totals = time.monotonic(), self._totals()
        previous, self._previous = self._previous, (now, totals)
        by_endpoint: dict[str, dict[str, float]] = defaultdict(dict)
        by_outcome: dict[str, float] = defaultdict(float)
        total = 0.0
        if previous is not None and now > previous[0]:
            elapsed = now - previous[0]
            for (endpoint, outcome), count in totals.items():
                # a worker that went away takes its counts along: never a negative rate
                rate = max(0.0, count - previous[1].get((endpoint, outcome), 0.0)) / elapsed
                if rate > 0:
                    by_endpoint[endpoint][outcome] = round(rate, 2)
                    by_outcome[outcome] += rate
                    total += rate
        return {
            "per_second": round(total, 2),
            "by_outcome": {k: round(v, 2) for k, v in sorted(by_outcome.items())},
            "by_endpoint": dict(sorted(by_endpoint.items())),
        }

    def _totals(self) -> Totals:
        """seckill_requests_total of this process, or of every worker (`serve --workers N`)."""
        services = self._services
        if services.shared_metrics is None:
            return {k: float(v) for k, v in services.metrics.requests.counts.items()}
        totals: Totals = defaultdict(float)
        text = services.shared_metrics.render().decode()
        for family in text_string_to_metric_families(text):
            if family.name != "seckill_requests":
                continue
            for sample in family.samples:
                if sample.name == "seckill_requests_total":
                    labels = sample.labels
                    totals[labels["endpoint"], labels["outcome"]] += sample.value
        return totals

    async def _from_redis(self) -> dict[str, Any]:
        services = self._services
        client = services.redis
        pipe = client.pipeline(transaction=False)
        pipe.smembers(keys.ACTIVITIES)
        pipe.exists(keys.heartbeat("writer"))
        pipe.exists(keys.heartbeat("sweeper"))
        members, writer, sweeper = await pipe.execute()
        ids = sorted(m.decode() for m in members)
        chosen = await self._choose(ids)
        now_ms = clock.now_ms()
        activities = await asyncio.gather(*(self._activity(a, now_ms) for a in chosen))
        return {
            "writer_alive": bool(writer),
            "sweeper_alive": bool(sweeper),
            "activities_total": len(ids),
            "activities": activities,
            "audit": await services.switches.audit(AUDIT_ENTRIES),
        }

    async def _choose(self, ids: list[str]) -> list[Activity]:
        """The activities worth a report now: live, then upcoming, then the latest ended."""
        if not ids:
            return []
        pipe = self._services.redis.pipeline(transaction=False)
        for activity_id in ids:
            pipe.hgetall(keys.meta(activity_id))
        metas = await pipe.execute()
        now = clock.now_ms()
        found = [Activity.from_meta(meta) for meta in metas if meta]

        def rank(a: Activity) -> tuple[int, int]:
            if a.opens_at_ms <= now < a.ends_at_ms:
                return (0, a.ends_at_ms)
            if now < a.opens_at_ms:
                return (1, a.opens_at_ms)
            return (2, -a.ends_at_ms)

        return sorted(found, key=rank)[:MAX_ACTIVITIES]

    async def _activity(self, activity: Activity, now_ms: int) -> dict[str, Any]:
        services = self._services
        flags = services.switches
        paused = flags.value(f"activity.{activity.id}.paused") is True
        body: dict[str, Any] = {
            "id": activity.id,
            "title": activity.title,
            "starts_at": clock.to_rfc3339(activity.starts_at_ms),
            "ends_at": clock.to_rfc3339(activity.ends_at_ms),
            "paused": paused,
            "closed": flags.value(f"activity.{activity.id}.closed") is True,
        }
        try:
            found = await report.build(services.redis, services.store, activity.id, deep_limit=-1)
        except StoreUnavailable:
            body["report"] = None
            body["error"] = "order store unavailable"
            found = None
        else:
            body["report"] = found
        available = found["available"] if found else 0
        body["state"] = activity.state(now_ms, available, paused)
        waiting = [  # a bucketed activity's buckets each have their stream
            await oldest_waiting_ms(services.redis, keys.stream(space))
            for space in buckets.spaces(activity.id, activity.buckets)
        ]
        oldest = min((ms for ms in waiting if ms), default=0)
        body["writer_lag_s"] = round(max(0, now_ms - oldest) / 1000, 1) if oldest else 0.0
        return body
