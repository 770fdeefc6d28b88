"""The one error middleware: every non-2xx answer is the contract's JSON error body."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from seckill.errors import Overloaded, SeckillError
from seckill.web.bodies import COUNTED, UNCOUNTED
from seckill.web.state import SERVICES, Services

log = logging.getLogger(__name__)

# at most one traceback per route in this many seconds; the other failures log one line
_TRACEBACK_EVERY_S = 10.0
_last_traceback: dict[str, float] = {}

_NEVER_SHED = frozenset({"healthz", "readyz", "metrics"})  # route names
SHED = Overloaded("too many requests in flight, retry later", retry_after=1)

# set on a returned (not raised) error response so the outcome is counted by its code
OUTCOME: web.ResponseKey[str] = web.ResponseKey("seckill.outcome", str)
_ENCODED: dict[tuple[str, str], bytes] = {}

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    431: "headers_too_large",
}


def refusal(error: SeckillError) -> web.Response:
    """The error's response without raising it: the storm's hot paths answer this way.

    Raising costs an exception's unwinding through every coroutine frame and the middleware;
    the body of each (code, message) is encoded once.
    """
    body = _ENCODED.get((error.code, error.message))
    if body is None:
        body = json.dumps({"error": {"code": error.code, "message": error.message}}).encode()
        if len(_ENCODED) < 256:
            _ENCODED[error.code, error.message] = body
    response = web.Response(body=body, status=error.status, content_type="application/json")
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    response[OUTCOME] = error.code
    return response


def error_response(
    status: int, code: str, message: str, retry_after: int | None = None
) -> web.Response:
    """The contract's error body, with Retry-After on 429/503."""
    response = web.json_response({"error": {"code": code, "message": message}}, status=status)
    if retry_after is None and status in (429, 503):
        retry_after = 1
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn SeckillError (and aiohttp's own HTTP errors) into contract errors; count outcomes."""
    route = request.match_info.route.name or "unmatched"
    return await answer(request.app[SERVICES], request, route, handler, request)


async def answer(
    services: Services,
    request: web.Request,
    route: str,
    handler: Callable[..., Awaitable[web.StreamResponse] | web.StreamResponse],
    *args: Any,
) -> web.StreamResponse:
    """``await handler(*args)`` as the error middleware runs it: shedding, the in-flight count,
    contract errors, outcome counts and latency. The order lane (web/lane.py) calls it directly.
    """
    at_capacity = services.in_flight >= services.settings.protection.max_in_flight
    if at_capacity and route not in _NEVER_SHED:
        # load shedding: a pre-encoded answer, before auth, parsing or any Redis call
        services.shed += 1
        services.metrics.count(route, "shed")
        return refusal(SHED)
    # a request counts in flight once its body is in (no body, or it came with the headers);
    # one still receiving its body is counted by read_limited when it arrives (web/bodies.py)
    counted = request.content.is_eof()
    if counted:
        services.in_flight += 1
    else:
        request[UNCOUNTED] = True
    metrics = services.metrics
    started = time.perf_counter()
    # the handler is awaited here, not in a helper coroutine: one frame less per request
    try:
        # a handler may answer without a coroutine (the order lane's sold-out answer)
        answered = handler(*args)
        response = answered if isinstance(answered, web.StreamResponse) else await answered
        metrics.count(route, response.get(OUTCOME, "ok"))
    except SeckillError as exc:
        metrics.count(route, exc.code)
        response = error_response(exc.status, exc.code, exc.message, exc.retry_after)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "invalid_request" if exc.status < 500 else "internal")
        metrics.count(route, code)
        response = error_response(exc.status, code, exc.reason)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        # the client went away mid-request (a dropped upload): not our failure, not an error
        metrics.count(route, "client_closed")
        if isinstance(exc, asyncio.CancelledError):
            raise
        response = error_response(400, "client_closed", "client closed the connection")
    except Exception as exc:
        _log_unexpected(request, route, exc)
        metrics.count(route, "internal")
        response = error_response(500, "internal", "internal error")
    finally:
        if counted or request.get(COUNTED, False):
            services.in_flight -= 1
        metrics.latencies.observe(route, time.perf_counter() - started)
    if services.draining or response.status == 408:
        response.force_close()  # 408: the rest of that body is not worth waiting for
    return response


def _log_unexpected(request: web.Request, route: str, exc: Exception) -> None:
    """One line with the path escaped (%r: no forged log lines); a traceback now and then."""
    now = time.monotonic()
    with_traceback = now - _last_traceback.get(route, -_TRACEBACK_EVERY_S) >= _TRACEBACK_EVERY_S
    if with_traceback:
        _last_traceback[route] = now
    log.error(
        "unhandled error on %r %r: %s",
        request.method,
        request.path,
        type(exc).__name__,
        exc_info=exc if with_traceback else None,
    )
