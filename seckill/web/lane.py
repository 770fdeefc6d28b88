"""The order POST's own lanes: the storm's one route, answered without aiohttp's machinery.

In a flash sale nearly every request is ``POST /api/v1/activities/<id>/orders``. Two lanes
take it, both deciding it with the same code as the routed handler (web/public.order_decision)
under the same guard as the error middleware (web/middlewares.answer): the same shedding,
in-flight count, contract errors, outcome counts and latency.

- **The protocol lane** (``ProtocolLane``, called by server.EdgeProtocol). For an order POST
  whose head and body came in one read, on a kept-alive HTTP/1.1 connection with nothing else
  in progress, the connection's protocol decides it from aiohttp's parsed message and writes
  the answer spelled as bytes (web/wire.py): no request object, no handler task for the
  sold-out answer, no response object, one socket write. aiohttp's own answer to the same
  request costs about three times as much as the decision itself.
- **The routed lane** (``install``): whatever the protocol lane passes on (the first request
  of a connection before aiohttp's loop is waiting, pipelined requests, a body still arriving
  is the router's) and every request of a server that is not seckill's own (the tests'
  client) skips the router's regular expressions and the middleware chain.

Anything else takes the ordinary way: other methods and paths, a query string, an id outside
[A-Za-z0-9_-]{1,64} (percent-encoded ones included), and a request whose body is still
arriving (its in-flight slot and deadline are read_limited's, which needs the routed request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http import HttpVersion11

from seckill.errors import PayloadTooLarge, SeckillError
from seckill.keys import ID_PATTERN
from seckill.purchase import Decision
from seckill.web.middlewares import SHED, answer
from seckill.web.public import order_decision, place_order
from seckill.web.state import SERVICES, Services
from seckill.web.wire import Answers

log = logging.getLogger(__name__)

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


class Message(Protocol):
    """What the protocol lane reads of aiohttp's parsed request head (RawRequestMessage)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def version(self) -> Any: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def should_close(self) -> bool: ...
    @property
    def upgrade(self) -> bool: ...


class Body(Protocol):
    """What the protocol lane reads of a request's payload (aiohttp's StreamReader)."""

    def is_eof(self) -> bool: ...
    def read_nowait(self, n: int = -1) -> bytes: ...


class ProtocolLane:
    """Order POSTs decided from aiohttp's parsed message, answered as bytes (web/wire.py).

    ``take`` returns None for a request it does not answer (aiohttp's loop gets it), the
    answer's bytes when the process decides alone (the sold-out answer: no task), or a task
    that gives them once Redis has answered. The task never raises but CancelledError: every
    failure is the contract's error body, as the error middleware makes it.
    """

    def __init__(self, services: Services) -> None:
        self._services = services
        self._answers = Answers()

    @property
    def draining(self) -> bool:
        """The process is shutting down: answers close their connection."""
        return self._services.draining

    def take(
        self, message: Message, payload: Body, remote: str | None
    ) -> bytes | asyncio.Task[bytes] | None:
        """Answer ``message`` if it is the lane's (see the module's docstring), else None."""
        if (
            message.method != "POST"
            or message.should_close
            or message.upgrade
            or message.version != HttpVersion11
        ):
            return None
        activity_id = order_activity("POST", message.path)
        services = self._services
        if activity_id is None or not payload.is_eof() or services.draining:
            return None
        answers = self._answers
        metrics = services.metrics
        if services.in_flight >= services.settings.protection.max_in_flight:
            services.shed += 1
            metrics.count(ROUTE, "shed")
            return answers.decision(activity_id, _SHED)[0]
        services.in_flight += 1
        started = time.perf_counter()
        try:
            headers = message.headers
            user_id, tier = services.users.user(headers.get("Authorization"))
            raw = payload.read_nowait()
            limit = services.settings.server.max_body_bytes
            if len(raw) > limit:
                raise PayloadTooLarge(f"body over {limit} bytes")
            decided = order_decision(services, headers, remote, activity_id, user_id, tier, raw)
            if not isinstance(decided, Decision):
                # Redis decides: the task owns the in-flight slot from here
                loop = asyncio.get_running_loop()
                return loop.create_task(self._later(activity_id, decided, started))
            data, outcome = answers.decision(activity_id, decided)
        except SeckillError as exc:
            data, outcome = answers.raised(exc), exc.code
        except Exception as exc:
            _log_unexpected(message, exc)
            data, outcome = answers.plain(500, "internal", "internal error"), "internal"
        services.in_flight -= 1
        metrics.count(ROUTE, outcome)
        metrics.latencies.observe(ROUTE, time.perf_counter() - started)
        return data

    async def _later(
        self, activity_id: str, deciding: Coroutine[None, None, Decision], started: float
    ) -> bytes:
        services = self._services
        outcome = "internal"
        try:
            data, outcome = self._answers.decision(activity_id, await deciding)
        except SeckillError as exc:
            data, outcome = self._answers.raised(exc), exc.code
        except asyncio.CancelledError:
            outcome = "client_closed"  # the loop is closing: nobody to answer
            raise
        except Exception as exc:
            _log_unexpected(None, exc)
            data = self._answers.plain(500, "internal", "internal error")
        finally:
            services.in_flight -= 1
            services.metrics.count(ROUTE, outcome)
            services.metrics.latencies.observe(ROUTE, time.perf_counter() - started)
        return data


_SHED = Decision(error=SHED)
# at most one traceback in this many seconds; the other failures log one line
_TRACEBACK_EVERY_S = 10.0
_last_traceback = [-_TRACEBACK_EVERY_S]


def _log_unexpected(message: Message | None, exc: Exception) -> None:
    now = time.monotonic()
    with_traceback = now - _last_traceback[0] >= _TRACEBACK_EVERY_S
    if with_traceback:
        _last_traceback[0] = now
    log.error(
        "unhandled error on an order POST %r: %s",
        message.path if message is not None else "",
        type(exc).__name__,
        exc_info=exc if with_traceback else None,
    )
