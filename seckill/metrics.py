"""Every Prometheus metric of seckill, named seckill_<noun>_<unit|total>.

The request path only bumps plain integers in a dict; a collector turns them into
Prometheus samples at scrape time. A ``labels(...).inc()`` per request costs about a third of
a bare handler's budget; a dict increment costs almost nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

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


class Gauges(Collector):
    """Gauges read at scrape time from live state (stock left per activity, ...)."""

    def __init__(self) -> None:
        self._sources: dict[
            str, tuple[str, list[str], Callable[[], dict[tuple[str, ...], float]]]
        ] = {}

    def add(
        self,
        name: str,
        documentation: str,
        labels: list[str],
        read: Callable[[], dict[tuple[str, ...], float]],
    ) -> None:
        self._sources[name] = (documentation, labels, read)

    def collect(self) -> Iterator[Metric]:
        for name, (documentation, labels, read) in self._sources.items():
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for values, value in read().items():
                family.add_metric(list(values), value)
            yield family


class Metrics:
    """The registry of one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestCounts()
        self.gauges = Gauges()
        self.registry.register(self.requests)
        self.registry.register(self.gauges)

    def count(self, endpoint: str, outcome: str) -> None:
        """One request answered."""
        self.requests.counts[endpoint, outcome] += 1

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
