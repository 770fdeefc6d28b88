"""The one error middleware: every non-2xx answer is the contract's JSON error body."""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from seckill.errors import Overloaded, SeckillError
from seckill.metrics import Metrics
from seckill.web.state import SERVICES

log = logging.getLogger(__name__)

_NEVER_SHED = frozenset({"/healthz", "/readyz", "/metrics"})
_SHED = Overloaded("too many requests in flight, retry later", retry_after=1)

# set on a returned (not raised) error response so the outcome is counted by its code
OUTCOME: web.ResponseKey[str] = web.ResponseKey("seckill.outcome", str)
_ENCODED: dict[tuple[str, str], bytes] = {}

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
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
    services = request.app[SERVICES]
    at_capacity = services.in_flight >= services.settings.protection.max_in_flight
    if at_capacity and request.path not in _NEVER_SHED:
        # load shedding: a pre-encoded answer, before auth, parsing or any Redis call
        services.shed += 1
        services.metrics.count(request.match_info.route.name or "unmatched", "shed")
        return refusal(_SHED)
    services.in_flight += 1
    started = time.perf_counter()
    try:
        response = await _answer(request, handler, services.metrics)
    finally:
        services.in_flight -= 1
        services.metrics.latencies.observe(
            request.match_info.route.name or "unmatched", time.perf_counter() - started
        )
    if services.draining:
        response.force_close()
    return response


async def _answer(request: web.Request, handler: Handler, metrics: Metrics) -> web.StreamResponse:
    route = request.match_info.route.name or "unmatched"
    try:
        response = await handler(request)
    except SeckillError as exc:
        metrics.count(route, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.retry_after)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "invalid_request" if exc.status < 500 else "internal")
        metrics.count(route, code)
        answer = error_response(exc.status, code, exc.reason)
        if exc.status == 405 and "Allow" in exc.headers:
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        metrics.count(route, "internal")
        return error_response(500, "internal", "internal error")
    metrics.count(route, response.get(OUTCOME, "ok"))
    return response
