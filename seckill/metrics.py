"""Every Prometheus metric of seckill, named seckill_<noun>_<unit|total>.

The request path only bumps plain integers in a dict; a collector turns them into
Prometheus samples at scrape time. A ``labels(...).inc()`` per request costs about a third of
a bare handler's budget; a dict increment costs almost nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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


Reading = Callable[[], dict[tuple[str, ...], float]]


class Readings(Collector):
    """Counters and gauges read at scrape time from live state (stock left, writer counts)."""

    def __init__(self) -> None:
        self._sources: dict[str, tuple[str, str, list[str], Reading]] = {}

    def add(
        self, name: str, documentation: str, kind: str, labels: list[str], read: Reading
    ) -> None:
        """Export ``read()`` as a ``kind`` ("counter" or "gauge") named ``name``."""
        self._sources[name] = (kind, documentation, labels, read)

    def collect(self) -> Iterator[Metric]:
        for name, (kind, documentation, labels, read) in self._sources.items():
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(
                    name.removesuffix("_total"), documentation, labels=labels
                )
            else:
                family = GaugeMetricFamily(name, documentation, labels=labels)
            for values, value in read().items():
                family.add_metric(list(values), value)
            yield family


class Metrics:
    """The registry of one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestCounts()
        self.readings = Readings()
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
            "seckill_sweeper_expired_total",
            "Reservations expired by the sweeper",
            "counter",
            [],
            count(sweeper.stats, "expired"),
        )

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
