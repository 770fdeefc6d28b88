"""Reading request bodies: the size limit first, then a deadline, then JSON.

A request whose body is still on its way is not counted in flight: only once the body is in
does it take a slot (max_in_flight, the graceful drain), so stalled uploads cannot hold the
slots real requests need, and the body deadline closes them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from seckill.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from seckill.web.state import SERVICES

# set once the request's body is in and it counts in flight (the middleware lets it go)
COUNTED: web.RequestKey[bool] = web.RequestKey("seckill.counted", bool)


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The raw body; PayloadTooLarge above ``limit`` bytes, RequestTimeout past the deadline."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body over {limit} bytes")
    content = request.content
    services = request.app[SERVICES]
    if content.is_eof():
        # the common case: a small body arrived with the headers, no timer needed
        raw = content.read_nowait()
        if len(raw) > limit:
            raise PayloadTooLarge(f"body over {limit} bytes")
    else:
        services.receiving += 1
        try:
            async with asyncio.timeout(services.settings.server.body_timeout_s):
                raw = await _read_to_end(content, limit)
        except TimeoutError:
            raise RequestTimeout() from None
        finally:
            services.receiving -= 1
    if not request.get(COUNTED, False) and request.body_exists:
        request[COUNTED] = True
        services.in_flight += 1
    return raw


async def _read_to_end(content: Any, limit: int) -> bytes:
    # a body may arrive in several segments (slow mobile networks)
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The decoded JSON value; InvalidRequest when it is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("body must be valid JSON") from None
