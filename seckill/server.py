"""Running the gateway: one process, or several sharing a port with SO_REUSEPORT.

The edge is configured here, in one place: every connection meets a header deadline, a header
budget, a keep-alive deadline and the connection caps before any handler runs; the body
deadline is applied where a body is read (web/bodies.py), with the same settings.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from seckill.metrics import Metrics
from seckill.orders.service import OrderService
from seckill.settings import ServerSettings, Settings
from seckill.web.app import create_app, create_ops_app
from seckill.web.lane import ProtocolLane
from seckill.web.state import SERVICES, Services

if TYPE_CHECKING:
    from seckill.payments.fake_wechatpay import FakeWechatPayServer

log = logging.getLogger(__name__)


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


# written straight to the socket: a header flood never reaches a request object
_HEADERS_TOO_LARGE = _error_body("headers_too_large", "request headers too large")
_RAW_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    % (len(_HEADERS_TOO_LARGE), _HEADERS_TOO_LARGE)
)
_TRACEBACK_EVERY_S = 10.0
# bytes a pipelining client may send while the protocol lane answers its request, before the
# connection stops being read until the answer is out
_HELD_MAX = 64 * 1024


class Edge:
    """The budgets every connection of one process shares, and what they refused."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.max_connections = settings.max_connections
        self.open = 0
        self.per_peer: dict[str, int] = {}
        # reason -> connections or requests refused at the edge (metrics)
        self.refused: dict[str, int] = {
            "max_connections": 0,
            "max_connections_per_peer": 0,
            "header_timeout": 0,
            "headers_too_large": 0,
            "bad_request": 0,
        }
        self._last_traceback = 0.0
        # answers order POSTs on the connections' own protocol (web/lane.py); None: aiohttp does
        self.lane: ProtocolLane | None = None

    def handler_kwargs(self) -> dict[str, Any]:
        """aiohttp's own limits: per line, per field, field count, keep-alive."""
        s = self.settings
        return {
            "keepalive_timeout": s.keepalive_timeout_s,
            "max_line_size": s.max_field_size,
            "max_field_size": s.max_field_size,
            "max_headers": s.max_headers,
            "access_log": None,  # a storm of access lines would cost more than the requests
            "lingering_time": 0.0,  # never wait on the rest of a body nobody will read
        }

    def traceback_due(self) -> bool:
        """True at most once per _TRACEBACK_EVERY_S: a flood of errors is not a flood of log."""
        now = time.monotonic()
        if now - self._last_traceback < _TRACEBACK_EVERY_S:
            return False
        self._last_traceback = now
        return True

    def add_metrics(self, metrics: Metrics) -> None:
        """Export the open connections and the edge's refusals."""
        metrics.readings.add(
            "seckill_connections_open",
            "Client connections this process holds open",
            "gauge",
            [],
            lambda: {(): float(self.open)},
        )
        metrics.readings.add(
            "seckill_edge_refused_total",
            "Connections or requests refused at the edge, before any handler, by reason",
            "counter",
            ["reason"],
            lambda: {(reason,): float(n) for reason, n in self.refused.items()},
        )


class EdgeProtocol(RequestHandler):
    """aiohttp's connection handler with a header deadline, a header budget and caps.

    aiohttp has no header deadline (its keep-alive timer is the only one, 3,630 s by default)
    and no budget for a whole header block (only per field and per count), so a client that
    sends half a header block, or a megabyte of them, would hold memory and a descriptor.
    """

    # aiohttp's handler has __slots__: with ours too, a write to an attribute of aiohttp's that
    # a release renamed raises instead of quietly making a new one (the lane sets several)
    __slots__ = (
        "_edge",
        "_header_bytes",
        "_header_timer",
        "_held",
        "_held_bytes",
        "_held_paused",
        "_lane_task",
        "_last_payload",
        "_peer",
    )

    def __init__(self, manager: web.Server, edge: Edge, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = edge
        self._peer: str | None = None
        self._header_bytes = 0
        self._last_payload: StreamReader | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        # the protocol lane's request in progress, and what arrived meanwhile
        self._lane_task: asyncio.Task[bytes] | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._held_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        edge = self._edge
        # the first request meets the header deadline instead of aiohttp's idle timer
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        if edge.open >= edge.max_connections:
            edge.refused["max_connections"] += 1
            self.force_close()
            return
        if edge.per_peer.get(peer, 0) >= edge.settings.max_connections_per_peer:
            edge.refused["max_connections_per_peer"] += 1
            self.force_close()
            return
        self._peer = peer
        edge.open += 1
        edge.per_peer[peer] = edge.per_peer.get(peer, 0) + 1
        self._header_timer = self._loop.call_later(
            edge.settings.header_timeout_s, self._headers_overdue
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        peer = self._peer
        if peer is not None:
            self._peer = None
            edge = self._edge
            edge.open -= 1
            left = edge.per_peer.get(peer, 1) - 1
            if left > 0:
                edge.per_peer[peer] = left
            else:
                edge.per_peer.pop(peer, None)
        super().connection_lost(exc)

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self._request_count == 0 and self.transport is not None:
            self._edge.refused["header_timeout"] += 1
            self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._lane_task is not None:
            self._hold(data)  # the lane is answering this connection's request: in order
            return
        waiter = self._waiter
        lane = self._edge.lane
        if lane is None or waiter is None or waiter.done() or self._messages or self._paused:
            # aiohttp's loop is busy (or not started), or the client is not reading its answers
            # (writing paused): aiohttp's request, whose loop waits for the socket to drain
            # and stops reading past its queue, so a client that never reads holds bounded
            # memory
            self._received(data)
            return
        # aiohttp's loop is idle, waiting for a request: held back while the protocol lane
        # looks at what this read brought
        self._waiter = None
        try:
            self._received(data)
        finally:
            self._waiter = waiter
        if self._force_close or self._close:
            waiter.cancel()  # what close() and force_close() do to the loop's waiter
            return
        messages = self._messages
        if len(messages) == 1 and not isinstance(messages[0][0], _ErrInfo):
            message, payload = messages[0]
            answered = lane.take(message, payload, self._peer)  # type: ignore[arg-type]
            if answered is not None:
                messages.popleft()
                if self._manager is not None:
                    self._manager.requests_count += 1
                if self._parser is not None:
                    self._parser.message_consumed()
                if isinstance(answered, bytes):
                    self._lane_write(answered, lane.draining)
                else:
                    # answered in turn: what arrives meanwhile waits (pipelining keeps order)
                    self._lane_task = answered
                    self._request_in_progress = True  # a graceful shutdown waits for it
                    answered.add_done_callback(self._lane_done)
                return
        if messages:
            waiter.set_result(None)

    def _lane_write(self, answer: bytes, closing: bool) -> None:
        """Write a lane's answer; the connection stays open under the keep-alive timer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left: nobody to answer
        if closing:
            # as the error middleware does while the process drains
            transport.write(answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
            self.force_close()
            return
        transport.write(answer)
        self._keepalive = True
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _lane_done(self, task: asyncio.Task[bytes]) -> None:
        self._lane_task = None
        self._request_in_progress = False
        if self._handler_waiter is not None and not self._handler_waiter.done():
            self._handler_waiter.set_result(None)
        if not task.cancelled():  # cancelled: the loop is closing, nobody to answer
            lane = self._edge.lane
            self._lane_write(task.result(), lane is not None and lane.draining)
        held, self._held, self._held_bytes = self._held, [], 0
        if self._held_paused:
            self._held_paused = False
            self._resume_reading_for_buffer()
        if held and self.transport is not None and not task.cancelled():
            self.data_received(b"".join(held))

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > _HELD_MAX and not self._held_paused and self.transport is not None:
            self._held_paused = True
            self._pause_reading_for_buffer()  # aiohttp's own hold: one flag for both

    def _process_keepalive(self) -> None:
        if self._lane_task is not None:
            # a request in progress is not an idle connection: look again later
            self._keepalive_handle = self._loop.call_later(
                self._keepalive_timeout, self._process_keepalive
            )
            return
        super()._process_keepalive()

    def _received(self, data: bytes) -> None:
        # aiohttp's parsing, under the header budget
        payload = self._last_payload
        # bytes count against the header budget only while no body is being received
        awaiting_headers = payload is None or payload.is_eof()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            # the whole-block budget for blocks that arrived in one piece: only a chunk over
            # the budget can hold one over it, so the common small request is not summed
            over = self._header_bytes + len(data) > self._edge.settings.max_header_bytes
            self._header_bytes = 0
            if over and self._headers_over_budget(self._request_count - count):
                self._edge.refused["headers_too_large"] += 1
                if self.transport is not None:
                    self.transport.write(_RAW_431)
                self.force_close()
                return
            if self._messages:
                last = self._messages[-1][1]
                self._last_payload = last if isinstance(last, StreamReader) else None
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif awaiting_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self._edge.settings.max_header_bytes:
                self._edge.refused["headers_too_large"] += 1
                if self.transport is not None:
                    self.transport.write(_RAW_431)
                self.force_close()

    def _headers_over_budget(self, new: int) -> bool:
        """Whether one of the ``new`` requests just parsed has a header block over the budget."""
        budget = self._edge.settings.max_header_bytes
        messages = list(self._messages)[-new:] if new > 0 else []
        for message, _ in messages:
            fields = getattr(message, "raw_headers", ())  # (a malformed one is refused anyway)
            if sum(len(name) + len(value) + 4 for name, value in fields) > budget:
                return True
        return False

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The contract's error body for what aiohttp refuses itself (bad or huge headers)."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        edge = self._edge
        too_large = isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message
        )
        if too_large:
            edge.refused["headers_too_large"] += 1
            status, code, text = 431, "headers_too_large", "request headers too large"
        elif 400 <= status < 500:
            edge.refused["bad_request"] += 1
            code, text = "invalid_request", "malformed HTTP request"
        else:
            # one line each, a traceback at most every few seconds (never a log flood)
            log.error(
                "error handling %r from %r: %r",
                request.path,
                request.remote,
                exc,
                exc_info=exc if exc is not None and edge.traceback_due() else None,
            )
            status, code, text = 500, "internal", "internal error"
        response = web.Response(
            body=_error_body(code, text), status=status, content_type="application/json"
        )
        response.force_close()
        return response


# What EdgeProtocol's lane reads or writes of aiohttp's connection handler and parser: private
# names, so the lane runs only on an aiohttp that has every one (pyproject pins the release).
_HANDLER_INTERNALS = (
    "_waiter",
    "_messages",
    "_parser",
    "_manager",
    "_force_close",
    "_close",
    "_request_in_progress",
    "_handler_waiter",
    "_keepalive",
    "_keepalive_handle",
    "_keepalive_timeout",
    "_next_keepalive_close_time",
    "_process_keepalive",
    "_request_count",
    "_paused",
    "_pause_reading_for_buffer",
    "_resume_reading_for_buffer",
)


def lane_internals_missing() -> list[str]:
    """The aiohttp internals the order lane needs that this aiohttp lacks (none: lane on)."""
    from aiohttp import http_parser

    missing = [name for name in _HANDLER_INTERNALS if not hasattr(RequestHandler, name)]
    parsers = {http_parser.HttpRequestParser, http_parser.HttpRequestParserPy}
    missing += [
        f"{parser.__name__}.message_consumed"
        for parser in parsers
        if not hasattr(parser, "message_consumed")
    ]
    return missing


class EdgeSite(web.TCPSite):
    """A TCP site whose connections are EdgeProtocol's."""

    def __init__(self, runner: web.AppRunner, edge: Edge, *args: Any, **kwargs: Any) -> None:
        super().__init__(runner, *args, **kwargs)
        self._edge = edge

    async def start(self) -> None:
        """Listen; each accepted connection gets an EdgeProtocol."""
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        edge = self._edge
        kwargs = edge.handler_kwargs()
        self._server = await loop.create_server(
            lambda: EdgeProtocol(server, edge, loop=loop, **kwargs),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


async def serve_until_signal(
    settings: Settings,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[str], None] | None = None,
    until: Awaitable[object] | None = None,
    with_orders: bool = False,
    fake_wechatpay: bool = False,
    settle_gc: bool = False,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``until``): stop accepting, finish in-flight, return.

    ``with_orders`` also runs the order writer and expiry sweeper in this process (`up`);
    ``fake_wechatpay`` runs a local WeChat Pay beside it, wired to it (`up --fake-wechatpay`);
    ``settle_gc`` tunes the process's cycle collector for serving (the CLI's processes, which
    serve and nothing else: a process that hosts a gateway among other work keeps its own).
    """
    app = create_app(settings)
    orders: OrderService | None = None
    stop_orders = asyncio.Event()
    orders_task: asyncio.Task[None] | None = None
    edge = Edge(settings.server)
    edge.max_connections = min(edge.max_connections, _connection_ceiling())
    edge.add_metrics(app[SERVICES].metrics)
    # the lane writes answers itself: only while nothing hooks into aiohttp's responses
    if not app.on_response_prepare and settings.server.order_lane:
        missing = lane_internals_missing()
        if missing:
            log.warning(
                "order lane off: this aiohttp lacks what it uses (%s); every request goes"
                " through aiohttp's loop",
                ", ".join(missing),
            )
        else:
            edge.lane = ProtocolLane(app[SERVICES])
    runner = web.AppRunner(
        app,
        access_log=None,  # a storm of access lines would cost more than the requests
        shutdown_timeout=settings.server.shutdown_timeout_s,
    )
    await runner.setup()
    site = EdgeSite(
        runner,
        edge,
        settings.server.host,
        settings.server.port,
        reuse_port=reuse_port or None,
        backlog=4096,
    )
    await site.start()
    ops_runner = await _start_ops(app, settings, reuse_port)
    port = settings.server.port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        port = server.sockets[0].getsockname()[1]
    url = f"http://{settings.server.host}:{port}"
    fake = await _wire_wechatpay(app[SERVICES], settings, url, fake_wechatpay)
    if with_orders:
        services = app[SERVICES]
        orders = OrderService(settings, services.redis, services.store, services.wechatpay)
        services.metrics.add_writer(orders.writer, orders.sweeper)
        services.metrics.add_loops(orders.supervisors)
        services.metrics.add_payments(orders)
        services.loops = orders.alive
        services.breakers.append(orders.writer.breaker)
        orders_task = asyncio.create_task(
            orders.run(stop_orders, final_drain_s=settings.server.shutdown_timeout_s)
        )
    if settle_gc:
        settle_garbage_collector()  # everything is up: the rest is serving
    if on_ready is not None:
        on_ready(url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
    if until is not None:
        waiters.append(asyncio.ensure_future(until))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        log.info("shutting down: finishing in-flight requests")
        # the handlers stay installed until the end: a repeated signal must not kill the drain
        await _drain(site, app[SERVICES], settings.server.shutdown_timeout_s)
        stop_orders.set()
        if orders_task is not None:
            await orders_task  # the writer finishes its batch while the gateway drains
        if ops_runner is not None:
            await ops_runner.cleanup()
        await runner.cleanup()
        if fake is not None:
            await fake.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _wire_wechatpay(
    services: Services, settings: Settings, url: str, fake_wechatpay: bool
) -> FakeWechatPayServer | None:
    """WeChat Pay from SECKILL_WECHATPAY_* (checked by the CLI already), or a local one.

    The local one (`up --fake-wechatpay`) gets fresh keys; the merchant settings that match it
    are written under var_dir/wechatpay (wechatpay.env), so tools beside `up` can use them.
    """
    from seckill.payments.fake_wechatpay import FakeWechatPayServer, development_setup
    from seckill.payments.wechatpay import WechatPay, WechatPayConfig

    fake: FakeWechatPayServer | None = None
    if fake_wechatpay:
        setup = development_setup()
        fake = FakeWechatPayServer(setup.fake)
        base_url = await fake.start()
        directory = Path(settings.server.var_dir) / "wechatpay"
        environment = setup.environment(directory, base_url, f"{url}/api/v1/payments/wechat/notify")
        (directory / "wechatpay.env").write_text(
            "".join(f"{name}={value}\n" for name, value in environment.items())
        )
        config = WechatPayConfig.from_env(environment)
        log.warning("local WeChat Pay (development) on %s, wired to this gateway", base_url)
    else:
        config = WechatPayConfig.from_env()
    if config is not None:
        log.info("%s", config.describe())
        services.wechatpay = WechatPay(config)
    return fake


async def _start_ops(
    app: web.Application, settings: Settings, reuse_port: bool
) -> web.AppRunner | None:
    """The internal listener for /metrics, /readyz and /healthz, when [server] ops_port is set."""
    if not settings.server.ops_port:
        return None
    runner = web.AppRunner(create_ops_app(app[SERVICES]), access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.server.ops_host,
        settings.server.ops_port,
        reuse_port=reuse_port or None,
        shutdown_timeout=1.0,
    )
    await site.start()
    log.info("ops endpoints on http://%s:%d", settings.server.ops_host, settings.server.ops_port)
    return runner


# the cycle collector's thresholds while serving: the youngest generation is collected every
# GC_YOUNG net allocations (Python's default is 700), the older ones every 50 of the younger
GC_YOUNG = 20_000


def settle_garbage_collector() -> None:
    """Once the gateway is up: what it holds from start-up leaves the cycle collector's view,
    and young collections come less often.

    Python's full collection walks every tracked object; with the app, its modules and caches
    that is tens of milliseconds, a stall of every request in flight (the purchase path's p99
    was 36 ms against 5 ms for the sold-out path, which allocates few tracked objects). Frozen
    objects are never walked again (gc.freeze); cycles made while serving (an exception and
    its traceback) are still collected by the young generations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 50, 50)


def _connection_ceiling() -> int:
    """Connections this process can hold: the open-files limit less a reserve for the rest."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1 << 30
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    # Redis pool, the store, logs, the listener: past this, every new connection would fail
    return max(int(soft) - 256, 64)


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; the soft limit now in force."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError):
                return int(soft)
            return int(target)
        return int(soft)
    except (ImportError, OSError, ValueError):
        return -1


async def _drain(site: web.TCPSite, services: Services, timeout_s: float) -> None:
    """Stop accepting, then wait for every request already started to answer.

    aiohttp's own shutdown ignores bytes that arrive after it begins, so a request whose body
    is still on its way would hang until the timeout: the drain happens before it.
    """
    await site.stop()
    services.draining = True
    deadline = asyncio.get_running_loop().time() + timeout_s
    # polled, not an Event: the request path stays a bare integer increment
    # a request still receiving its body started before the signal: it is finished too
    # (bounded by the body deadline), though it never counted for load shedding
    while (  # noqa: ASYNC110
        services.in_flight or services.receiving
    ) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    if services.in_flight or services.receiving:
        log.warning(
            "%d requests still in flight after %.1fs",
            services.in_flight + services.receiving,
            timeout_s,
        )


def _worker(settings: Settings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; SIGTERM stops us
    uvloop.run(serve_until_signal(settings, reuse_port=True, settle_gc=True))


def serve(
    settings: Settings,
    workers: int,
    on_ready: Callable[[str], None],
    with_orders: bool = False,
    fake_wechatpay: bool = False,
) -> int:
    """Run ``workers`` gateway processes on one port; returns the exit code."""
    if workers == 1:
        uvloop.run(
            serve_until_signal(
                settings,
                on_ready=on_ready,
                with_orders=with_orders,
                fake_wechatpay=fake_wechatpay,
                settle_gc=True,
            )
        )
        return 0
    if settings.server.port == 0:
        print("seckill: --workers > 1 needs a fixed --port", file=sys.stderr)
        return 2
    # /metrics on any worker shows every worker's figures (labelled worker="<pid>")
    shared = Path(settings.server.var_dir).resolve() / f"metrics-{os.getpid()}"
    settings = settings.replace("server", metrics_dir=str(shared))
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_worker, args=(settings,)) for _ in range(workers)]
    for child in children:
        child.start()
    on_ready(f"http://{settings.server.host}:{settings.server.port}")

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.is_alive():
                child.terminate()

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    failed = 0
    for child in children:
        child.join()
        failed += child.exitcode not in (0, -signal.SIGTERM)
    shutil.rmtree(shared, ignore_errors=True)
    return 1 if failed else 0
