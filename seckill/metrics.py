"""Every Prometheus metric of seckill, named seckill_<noun>_<unit|total>.

The request path only bumps plain integers in a dict; a collector turns them into
Prometheus samples at scrape time. A ``labels(...).inc()`` per request costs about a third of
a bare handler's budget; a dict increment costs almost nothing.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class RequestCounts(Collector):
    """seckill_requests_total{endpoint, outcome}: endpoint is a route name, outcome a code."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, str], int] = defaultdict(int)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "seckill_requests",
            "HTTP requests by endpoint and outcome",
            labels=["endpoint", "outcome"],
        )
        for (endpoint, outcome), count in sorted(self.counts.items()):
            family.add_metric([endpoint, outcome], count)
        yield family


class Latencies(Collector):
    """seckill_request_duration_seconds{endpoint}: bucket counts bumped in place per request."""

    BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, endpoint: str, seconds: float) -> None:
        counts = self.counts.get(endpoint)
        if counts is None:
            counts = self.counts[endpoint] = [0] * (len(self.BOUNDS) + 1)
            self.sums[endpoint] = 0.0
        counts[bisect_left(self.BOUNDS, seconds)] += 1
        self.sums[endpoint] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "seckill_request_duration_seconds",
            "Time from the handler's start to its answer, by endpoint",
            labels=["endpoint"],
        )
        for endpoint, counts in sorted(self.counts.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self.BOUNDS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            family.add_metric([endpoint], buckets, self.sums[endpoint])
        yield family


Reading = Callable[[], dict[tuple[str, ...], float]]

_BREAKER_STATES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}


class Readings(Collector):
    """Counters and gauges read at scrape time from live state (stock left, writer counts)."""

    def __init__(self) -> None:
        self._sources: dict[str, tuple[str, str, list[str], list[Reading]]] = {}

    def add(
        self, name: str, documentation: str, kind: str, labels: list[str], read: Reading
    ) -> None:
        """Export ``read()`` as a ``kind`` ("counter" or "gauge") named ``name``.

        Several sources may feed one name (the gateway's and the writer's breakers in `up`).
        """
        if name in self._sources:
            self._sources[name][3].append(read)
        else:
            self._sources[name] = (kind, documentation, labels, [read])

    def collect(self) -> Iterator[Metric]:
        for name, (kind, documentation, labels, reads) in self._sources.items():
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(
                    name.removesuffix("_total"), documentation, labels=labels
                )
            else:
                family = GaugeMetricFamily(name, documentation, labels=labels)
            for read in reads:
                for values, value in read().items():
                    family.add_metric(list(values), value)
            yield family


class Metrics:
    """The registry of one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestCounts()
        self.readings = Readings()
        self.latencies = Latencies()
        self.registry.register(self.latencies)
        self.registry.register(self.requests)
        self.registry.register(self.readings)

    def count(self, endpoint: str, outcome: str) -> None:
        """One request answered."""
        self.requests.counts[endpoint, outcome] += 1

    def add_writer(self, writer: Any, sweeper: Any) -> None:
        """Export an order writer's and an expiry sweeper's counts."""

        def count(stats: Any, field: str) -> Reading:
            return lambda: {(): float(getattr(stats, field))}

        for field, doc in (
            ("rows", "Stream entries written to the order store"),
            ("batches", "Store transactions committed by the writer"),
            ("dead_letters", "Entries moved to a dead-letter stream"),
            ("illegal_transitions", "Status transitions refused by the store"),
            ("store_failures", "Store calls that failed for want of the database"),
            ("trimmed", "Acknowledged stream entries trimmed (MINID)"),
        ):
            self.readings.add(
                f"seckill_writer_{field}_total", doc, "counter", [], count(writer.stats, field)
            )
        self.readings.add(
            "seckill_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            "gauge",
            ["breaker"],
            lambda: {(writer.breaker.name,): _BREAKER_STATES[writer.breaker.state]},
        )
        self.readings.add(
            "seckill_stream_backlog",
            "Accepted orders not yet persisted (pending + undelivered), by activity",
            "gauge",
            ["activity"],
            lambda: {(a,): float(total) for a, (total, _) in writer.backlog.items()},
        )
        self.readings.add(
            "seckill_writer_lag_seconds",
            "Age of the oldest accepted order not yet persisted, by activity",
            "gauge",
            ["activity"],
            lambda: {(a,): lag for a, (_, lag) in writer.backlog.items()},
        )
        for field, doc in (
            ("acks_deferred", "Stored entries whose XACK waited for Redis to take writes again"),
            ("redis_errors", "Writer rounds ended by Redis unreachable or an error reply"),
            ("consumers_forgotten", "Gone writers removed from the consumer group"),
            (
                "entries_gone",
                "Entries read that a failover took out of Redis before a replica"
                " had them, never stored (durability replicated)",
            ),
        ):
            self.readings.add(
                f"seckill_writer_{field}_total", doc, "counter", [], count(writer.stats, field)
            )
        self.readings.add(
            "seckill_writer_store_errors_total",
            "Store errors by class: away (retried, never the entry's fault) or entry (refused)",
            "counter",
            ["class"],
            lambda: {
                ("away",): float(writer.stats.store_failures),
                ("entry",): float(writer.stats.entries_rejected),
            },
        )
        self.readings.add(
            "seckill_sweeper_expired_total",
            "Reservations expired by the sweeper",
            "counter",
            [],
            count(sweeper.stats, "expired"),
        )

    def add_loops(self, supervisors: Iterable[Any]) -> None:
        """Export whether each supervised background loop runs, and how often it restarted."""
        loops = list(supervisors)
        self.readings.add(
            "seckill_loop_up",
            "1 while a background loop (writer, sweeper) runs in this process, 0 while it is down",
            "gauge",
            ["loop"],
            lambda: {(s.name,): float(s.up) for s in loops},
        )
        self.readings.add(
            "seckill_loop_restarts_total",
            "Times a background loop failed and was restarted by its supervisor",
            "counter",
            ["loop"],
            lambda: {(s.name,): float(s.restarts) for s in loops},
        )

    def add_payments(self, service: Any) -> None:
        """Export the payment loops of an order service (zeros while WeChat Pay is off)."""

        def held() -> dict[tuple[str, ...], float]:
            settler = service.settler
            return {(): float(settler.held() if settler is not None else 0)}

        def over() -> dict[tuple[str, ...], float]:
            settler = service.settler
            return {(): float(settler.over_ceiling() if settler is not None else 0)}

        self.readings.add(
            "seckill_payment_held_orders",
            "Due prepaid orders whose stock stays held until the payment provider answers",
            "gauge",
            [],
            held,
        )
        self.readings.add(
            "seckill_payment_held_over_ceiling",
            "Of those, held longer than [payment] hold_ceiling_s after their deadline (ops: look)",
            "gauge",
            [],
            over,
        )

        def refunds() -> dict[tuple[str, ...], float]:
            refunder = service.refunder
            if refunder is None:
                return {}
            stats = refunder.stats
            return {
                ("requested",): float(stats.requested),
                ("refunded",): float(stats.refunded),
                ("retry",): float(stats.retries),
                ("attention",): float(stats.attention),
            }

        self.readings.add(
            "seckill_refunds_total",
            "Refund calls by outcome (attention: the provider will not finish it alone)",
            "counter",
            ["outcome"],
            refunds,
        )

        def reconciled() -> dict[tuple[str, ...], float]:
            reconciler = service.reconciler
            if reconciler is None:
                return {}
            stats = reconciler.stats
            return {
                ("query",): float(stats.queries),
                ("confirmed",): float(stats.confirmed),
                ("closed",): float(stats.closed),
            }

        self.readings.add(
            "seckill_payment_reconciled_total",
            "Reconciler calls to the provider and what they found (confirmed: a lost payment)",
            "counter",
            ["outcome"],
            reconciled,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class Shared:
    """Metrics of several gateway processes (`serve --workers N`), merged on every scrape.

    Each process keeps its counters in memory (cheap) and writes its exposition to
    ``<directory>/<pid>.prom`` once a second; whichever process answers /metrics merges the
    files of the processes still alive, each sample labelled ``worker="<pid>"`` so that
    ``sum by (...)`` gives the totals. Its own figures are always fresh, the others' at most
    a second old.
    """

    def __init__(self, directory: Path, metrics: Metrics) -> None:
        self.directory = directory
        self.metrics = metrics
        self.directory.mkdir(parents=True, exist_ok=True)
        self._closed = False

    def publish(self) -> None:
        """Write this process's exposition (atomically: write, then rename)."""
        target = self.directory / f"{os.getpid()}.prom"
        temporary = target.with_suffix(".tmp")
        temporary.write_bytes(self.metrics.render())
        temporary.replace(target)

    def render(self) -> bytes:
        """Every live process's metrics, labelled by worker."""
        families: dict[str, Metric] = {}
        own = os.getpid()
        texts = {own: self.metrics.render().decode()}
        for path in self.directory.glob("*.prom"):
            pid = int(path.stem)
            if pid == own:
                continue
            try:
                os.kill(pid, 0)
                texts[pid] = path.read_text()
            except (ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # a worker that is gone
            except PermissionError:
                texts[pid] = path.read_text()
        for pid, text in sorted(texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    merged.samples.append(
                        sample._replace(labels={**sample.labels, "worker": str(pid)})
                    )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(list(families.values())))
        return generate_latest(registry)

    def close(self) -> None:
        self._closed = True

    async def run(self) -> None:
        """Publish every second until closed; remove this process's file at the end."""
        try:
            while not self._closed:
                self.publish()
                await asyncio.sleep(1.0)
        finally:
            (self.directory / f"{os.getpid()}.prom").unlink(missing_ok=True)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
