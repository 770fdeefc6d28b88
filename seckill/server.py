"""Running the gateway: one process, or several sharing a port with SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from aiohttp import web

from seckill.orders.service import OrderService
from seckill.settings import Settings
from seckill.web.app import create_app
from seckill.web.state import SERVICES, Services

log = logging.getLogger(__name__)


async def serve_until_signal(
    settings: Settings,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[str], None] | None = None,
    until: Awaitable[object] | None = None,
    with_orders: bool = False,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``until``): stop accepting, finish in-flight, return.

    ``with_orders`` also runs the order writer and expiry sweeper in this process (`up`).
    """
    app = create_app(settings)
    orders: OrderService | None = None
    stop_orders = asyncio.Event()
    orders_task: asyncio.Task[None] | None = None
    runner = web.AppRunner(
        app,
        access_log=None,  # a storm of access lines would cost more than the requests
        shutdown_timeout=settings.server.shutdown_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.server.host,
        settings.server.port,
        reuse_port=reuse_port or None,
        backlog=4096,
        shutdown_timeout=settings.server.shutdown_timeout_s,
    )
    await site.start()
    if with_orders:
        services = app[SERVICES]
        orders = OrderService(settings, services.redis, services.store)
        services.metrics.add_writer(orders.writer, orders.sweeper)
        services.metrics.add_loops(orders.supervisors)
        services.loops = orders.alive
        orders_task = asyncio.create_task(
            orders.run(stop_orders, final_drain_s=settings.server.shutdown_timeout_s)
        )
    port = settings.server.port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        port = server.sockets[0].getsockname()[1]
    url = f"http://{settings.server.host}:{port}"
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
        await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _drain(site: web.TCPSite, services: Services, timeout_s: float) -> None:
    """Stop accepting, then wait for every request already started to answer.

    aiohttp's own shutdown ignores bytes that arrive after it begins, so a request whose body
    is still on its way would hang until the timeout: the drain happens before it.
    """
    await site.stop()
    services.draining = True
    deadline = asyncio.get_running_loop().time() + timeout_s
    # polled, not an Event: the request path stays a bare integer increment
    while services.in_flight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if services.in_flight:
        log.warning("%d requests still in flight after %.1fs", services.in_flight, timeout_s)


def _worker(settings: Settings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; SIGTERM stops us
    uvloop.run(serve_until_signal(settings, reuse_port=True))


def serve(
    settings: Settings, workers: int, on_ready: Callable[[str], None], with_orders: bool = False
) -> int:
    """Run ``workers`` gateway processes on one port; returns the exit code."""
    if workers == 1:
        uvloop.run(serve_until_signal(settings, on_ready=on_ready, with_orders=with_orders))
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
