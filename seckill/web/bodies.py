"""Reading request bodies: the size limit first, then JSON."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from seckill.errors import InvalidRequest, PayloadTooLarge


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The raw body; PayloadTooLarge above ``limit`` bytes, without reading past it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body over {limit} bytes")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"body over {limit} bytes")
    return body


def parse_json(raw: bytes) -> Any:
    """The decoded JSON value; InvalidRequest when it is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("body must be valid JSON") from None
