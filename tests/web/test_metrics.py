"""The metrics ops watch during a sale: names, labels and values that add up."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp.test_utils import TestClient

from seckill.metrics import Metrics
from seckill.orders.sweeper import Sweeper
from seckill.orders.writer import Writer, WriterConfig
from seckill.settings import Settings
from seckill.web.state import SERVICES
from tests.helpers import activity_body, admin_headers, user_headers

Client = TestClient[Any, Any]


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert match, f"{sample} not exported"
    return float(match.group(1))


async def test_requests_latencies_stock_and_backlog_are_exported(
    client: Client, settings: Settings
) -> None:
    body = activity_body(stock=3)
    await client.post("/admin/v1/activities", json=body, headers=admin_headers(settings))
    for n in range(5):
        await client.post(
            f"/api/v1/activities/{body['id']}/orders",
            json={"quantity": 1},
            headers=user_headers(settings, f"u{n}", "k"),
        )
    await asyncio.sleep(0.6)  # one catalog refresh
    text = await (await client.get("/metrics")).text()
    ok = _value(text, 'seckill_requests_total{endpoint="order_create",outcome="ok"}')
    sold_out = _value(text, 'seckill_requests_total{endpoint="order_create",outcome="sold_out"}')
    assert (ok, sold_out) == (3, 2)
    count = _value(text, 'seckill_request_duration_seconds_count{endpoint="order_create"}')
    inf = _value(text, 'seckill_request_duration_seconds_bucket{endpoint="order_create",le="+Inf"}')
    assert count == inf == 5
    assert _value(text, f'seckill_stock_left{{activity="{body["id"]}"}}') == 0
    assert _value(text, 'seckill_breaker_state{breaker="redis"}') == 0
    assert _value(text, 'seckill_flag_value{flag="seckill.enabled"}') == 1

    services = client.server.app[SERVICES]
    writer = Writer(services.redis, services.store, WriterConfig(block_ms=10), "m")
    metrics = Metrics()
    metrics.add_writer(writer, Sweeper(services.stock))
    await writer._discover()
    await writer._sample_backlog()
    exported = metrics.render().decode()
    assert _value(exported, f'seckill_stream_backlog{{activity="{body["id"]}"}}') == 3
    assert _value(exported, f'seckill_writer_lag_seconds{{activity="{body["id"]}"}}') > 0
    await writer.drain()
    await writer._sample_backlog()
    exported = metrics.render().decode()
    assert _value(exported, f'seckill_stream_backlog{{activity="{body["id"]}"}}') == 0
    assert _value(exported, "seckill_writer_rows_total") == 3
