"""Reading request bodies: the size limit first, then a deadline, then JSON.

A request whose body is still on its way is not counted in flight: only once the body is in
does it take a slot (max_in_flight, the graceful drain), so stalled uploads cannot hold the
slots real requests need, and the body deadline closes them. The error middleware counts a
request whose body was already in when it started (the common case); read_limited counts the
others once their body has arrived.
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
# set by the middleware on a request whose body was still arriving when it started
UNCOUNTED: web.RequestKey[bool] = web.RequestKey("seckill.uncounted", bool)


def body_now(request: web.Request, limit: int) -> bytes | None:
    """The raw body when it is all in already (the common case: it came with the headers),
    else None: then await read_limited. Raises as read_limited does; no coroutine, no timer.

    Only before the handler's first await: the body was then in when the middleware counted
    the request in flight, or it still is not (and read_limited counts it).
    """
    content = request.content
    if not content.is_eof():
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"body over {limit} bytes")
        return None
    raw = content.read_nowait()
    if len(raw) > limit:
        raise PayloadTooLarge(f"body over {limit} bytes")
    return raw


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The raw body; PayloadTooLarge above ``limit`` bytes, RequestTimeout past the deadline."""
    raw = body_now(request, limit)
    if raw is not None:
        _count_in_flight(request)  # the body may have come in while the handler awaited
        return raw
    services = request.app[SERVICES]
    services.receiving += 1
    try:
        async with asyncio.timeout(services.settings.server.body_timeout_s):
            raw = await _read_to_end(request.content, limit)
    except TimeoutError:
        raise RequestTimeout() from None
    finally:
        services.receiving -= 1
    _count_in_flight(request)
    return raw


def _count_in_flight(request: web.Request) -> None:
    # the body is in: from now on the request holds an in-flight slot (the middleware frees it)
    if request.get(UNCOUNTED, False) and not request.get(COUNTED, False):
        request[COUNTED] = True
        request.app[SERVICES].in_flight += 1


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
