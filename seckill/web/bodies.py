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
    # read to the end: a body may arrive in several segments (slow mobile networks)
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
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
