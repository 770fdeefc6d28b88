"""/readyz tells a running `seckill up` whose writer or sweeper is down."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from seckill.web.state import SERVICES

Client = TestClient[Any, Any]


async def test_readyz_names_a_background_loop_that_is_down(client: Client) -> None:
    """Invariant: a gateway whose writer or sweeper is not running is not ready."""
    services = client.server.app[SERVICES]
    assert (await client.get("/readyz")).status == 200  # `serve`: no loops in this process

    loops = {"writer": True, "sweeper": True}
    services.loops = lambda: dict(loops)
    assert (await client.get("/readyz")).status == 200

    loops["writer"] = False
    response = await client.get("/readyz")
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "overloaded" and "writer not running" in error["message"]

    loops["sweeper"] = False
    message = (await (await client.get("/readyz")).json())["error"]["message"]
    assert "sweeper" in message and "writer" in message
