"""The order POST's own lane: the storm's one route, answered without the router or the chain.

In a flash sale nearly every request is ``POST /api/v1/activities/<id>/orders``. aiohttp finds
its handler by trying the routes under ``/api/v1/activities`` one regular expression at a
time, then wraps it in the middleware chain (a context manager for the current app, the error
middleware): together about a sixth of the sold-out answer's cost. The lane recognises that
one path by string operations on the raw request line and calls the handler under the same
guard as the error middleware (web/middlewares.answer): the same shedding, in-flight count,
contract errors, outcome counts and latency.

Anything else takes the ordinary way: other methods and paths, a query string, an id outside
[A-Za-z0-9_-]{1,64} (percent-encoded ones included), and a request whose body is still
arriving (its in-flight slot and deadline are read_limited's, which needs the routed request).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from seckill.keys import ID_PATTERN
from seckill.web.middlewares import answer
from seckill.web.public import place_order
from seckill.web.state import SERVICES

_PREFIX = "/api/v1/activities/"
_SUFFIX = "/orders"
ROUTE = "order_create"

Handle = Callable[[web.Request], Awaitable[web.StreamResponse]]


def order_activity(method: str, raw_path: str) -> str | None:
    """The activity id when this is an order POST the lane answers, else None."""
    if method != "POST" or not raw_path.endswith(_SUFFIX) or not raw_path.startswith(_PREFIX):
        return None
    activity_id = raw_path[len(_PREFIX) : -len(_SUFFIX)]
    return activity_id if ID_PATTERN.fullmatch(activity_id) else None


def install(app: web.Application) -> None:
    """Put the lane in front of ``app``'s own request handling (before the app is run)."""
    routed: Handle = app._handle
    services = app[SERVICES]

    def handle(request: web.Request) -> Awaitable[web.StreamResponse]:
        # a plain function returning the coroutine to await: no frame of its own
        activity_id = order_activity(request.method, request.raw_path)
        if activity_id is None or not request.content.is_eof():
            return routed(request)
        return answer(services, request, ROUTE, place_order, services, request, activity_id)

    # aiohttp's runner builds its server around app._handle when it starts
    app._handle = handle  # type: ignore[method-assign, assignment]
