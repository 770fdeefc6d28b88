"""The protocol lane: order POSTs answered by seckill's own connection protocol, byte for byte
as aiohttp answers them, in order on a connection, under the same keep-alive deadline.

The gateway here is the real server (server.serve_until_signal: EdgeSite, EdgeProtocol) on a
real Redis, driven over raw sockets so every byte of each answer is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from seckill import server
from seckill.embedded import EmbeddedRedis
from seckill.settings import Settings
from seckill.web import lane, public
from tests.helpers import activity_body, admin_headers, user_headers


@dataclass
class Gateway:
    host: str
    port: int
    routed: list[str]  # paths aiohttp's loop handed to a handler (the routed or app lane)


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def without_date(self) -> tuple[int, list[tuple[str, str]], bytes]:
        return self.status, [(k, v) for k, v in self.headers if k != "Date"], self.body


@contextlib.asynccontextmanager
async def _start(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, *, settle_gc: bool = False
) -> AsyncIterator[Gateway]:
    routed: list[str] = []

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def place_order(services: Any, request: Any, activity_id: str) -> Any:
            routed.append(request.raw_path)
            return original(services, request, activity_id)

        return place_order

    # the routed handler and the app-level lane each call place_order; the protocol lane never
    monkeypatch.setattr(public, "place_order", counting(public.place_order))
    monkeypatch.setattr(lane, "place_order", counting(lane.place_order))
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(
        server.serve_until_signal(
            settings.replace("server", port=0),
            on_ready=ready.set_result,
            until=stop,
            settle_gc=settle_gc,
        )
    )
    url = await asyncio.wait_for(asyncio.shield(ready), 60)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        yield Gateway(host, int(port), routed)
    finally:
        stop.set_result(None)
        await asyncio.wait_for(serving, 60)


@pytest.fixture
async def gateway(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    async with _start(settings.replace("server", keepalive_timeout_s=2.0), monkeypatch) as started:
        yield started


def _request(
    method: str, path: str, headers: dict[str, str], body: bytes = b"", version: str = "1.1"
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: gateway"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _order(settings: Settings, activity_id: str, user: str = "u1", key: str = "k1") -> bytes:
    """One shopper's order POST of one unit."""
    headers = user_headers(settings, user, key)
    return _request("POST", f"/api/v1/activities/{activity_id}/orders", headers, b'{"quantity": 1}')


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status_line, *fields = head.decode().split("\r\n")[:-2]
    headers = [(k, v) for k, _, v in (f.partition(": ") for f in fields)]
    length = int(dict(headers)["Content-Length"])
    body = await asyncio.wait_for(reader.readexactly(length), 30)
    return Answer(int(status_line.split(" ")[1]), headers, body)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def ask(self, request: bytes) -> Answer:
        self.writer.write(request)
        await self.writer.drain()
        return await _read_answer(self.reader)


@contextlib.asynccontextmanager
async def _connect(gateway: Gateway) -> AsyncIterator[Connection]:
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        yield Connection(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _admin(connection: Connection, settings: Settings, body: dict[str, Any]) -> None:
    headers = {**admin_headers(settings), "Content-Type": "application/json"}
    answer = await connection.ask(
        _request("POST", "/admin/v1/activities", headers, json.dumps(body).encode())
    )
    assert answer.status == 201, answer


async def _warm(connection: Connection, gateway: Gateway) -> None:
    """One request on the connection first: aiohttp's loop then waits for the next one."""
    await connection.ask(_request("GET", "/healthz", {}))


async def test_every_laned_answer_is_the_routed_answer_byte_for_byte(
    gateway: Gateway, settings: Settings
) -> None:
    gone, live = activity_body(stock=0), activity_body(stock=100, per_user_limit=1)
    async with _connect(gateway) as connection:
        for body in (gone, live):
            await _admin(connection, settings, body)
        await _warm(connection, gateway)
        too_big = json.dumps({"quantity": 1, "pad": "x" * 5000}).encode()
        cases: list[tuple[str, dict[str, str], bytes]] = [
            (gone["id"], user_headers(settings, "u1", "k1"), b'{"quantity": 1}'),  # sold out
            (gone["id"], user_headers(settings, "u1", "k1"), b'{"quantity": 0}'),  # bad body
            (gone["id"], user_headers(settings, "u1", "k1"), b"not json"),
            (gone["id"], {"Idempotency-Key": "k1"}, b'{"quantity": 1}'),  # no token
            (gone["id"], {**user_headers(settings, "u1"), "Idempotency-Key": "a b"}, b"{}"),
            (gone["id"], user_headers(settings, "u1"), b'{"quantity": 1}'),  # no key
            (gone["id"], user_headers(settings, "u1", "k1"), too_big),  # 413
            ("nosuch", user_headers(settings, "u1", "k1"), b'{"quantity": 1}'),  # 404
        ]
        pairs = []
        for activity_id, headers, body in cases:
            laned = f"/api/v1/activities/{activity_id}/orders"
            answers = []
            for path in (laned, laned + "?via=router"):
                answers.append(await connection.ask(_request("POST", path, headers, body)))
            pairs.append(answers)

        async def buy(user: str, key: str, routed: bool = False) -> Answer:
            path = f"/api/v1/activities/{live['id']}/orders" + ("?via=router" if routed else "")
            headers = user_headers(settings, user, key)
            return await connection.ask(_request("POST", path, headers, b'{"quantity": 1}'))

        # a purchase, then its replay: the routed one is another user's (its own order id)
        won, replayed = await buy("w1", "k1"), await buy("w1", "k1")
        routed_won = await buy("w2", "k1", routed=True)
        limit, routed_limit = await buy("w1", "k2"), await buy("w2", "k2", routed=True)
        # the user's Redis bucket (burst 10, 5/s): well within 60 tries one of them is a 429
        limited = []
        for user, routed in (("r1", False), ("r2", True)):
            for n in range(60):
                answer = await buy(user, f"r{n}", routed)
                if answer.status == 429:
                    limited.append(answer)
                    break
        metrics = await connection.ask(_request("GET", "/metrics", {}))
    assert len(limited) == 2
    # every laned request gave its in-flight slot back (the scrape itself holds one)
    assert b"\nseckill_in_flight 1.0\n" in metrics.body
    assert b'seckill_requests_total{endpoint="order_create",outcome="sold_out"} 2.0' in metrics.body
    assert limited[0].without_date() == limited[1].without_date()
    assert dict(limited[0].headers)["RateLimit-Remaining"] == "0"
    # only the routed halves reached aiohttp's handlers (the healthz and admin calls have none)
    routed_tries = sum("via=router" in path for path in gateway.routed[len(cases) + 2 :])
    assert len(gateway.routed) == len(cases) + 2 + routed_tries
    assert all("via=router" in path for path in gateway.routed)
    for laned, routed in pairs:
        assert laned.without_date() == routed.without_date()
        assert dict(laned.headers)["Date"].endswith(" GMT")
    assert [laned.status for laned, _ in pairs] == [409, 400, 400, 401, 400, 400, 413, 404]
    assert limit.without_date() == routed_limit.without_date()
    assert limit.status == 409 and json.loads(limit.body)["error"]["code"] == "limit_reached"

    def shape(answer: Answer) -> tuple[int, list[str], set[str]]:
        return answer.status, [k for k, _ in answer.headers], set(json.loads(answer.body))

    assert won.status == 202
    assert shape(won) == shape(routed_won)
    order = json.loads(won.body)
    assert dict(won.headers)["Location"] == f"/api/v1/orders/{order['order_id']}"
    assert json.loads(replayed.body) == order
    assert dict(replayed.headers)["Idempotent-Replayed"] == "true"
    assert [k for k, _ in replayed.headers] == [
        "Content-Type", "Location", "Idempotent-Replayed", "Content-Length", "Date", "Server"
    ]  # fmt: skip
    # spelled as the routed handler spells its body (json.dumps of the same dict)
    assert won.body == json.dumps(order).encode()


async def test_answers_keep_their_order_on_a_pipelining_connection(
    gateway: Gateway, settings: Settings
) -> None:
    live = activity_body(stock=1000, per_user_limit=1000)
    async with _connect(gateway) as connection:
        await _admin(connection, settings, live)
        await _warm(connection, gateway)
        for n in range(40):
            headers = user_headers(settings, f"p{n}")  # one each: the per-user rate stays out
            # a purchase (the lane waits on Redis), and right behind it a read of the activity:
            # sent in one write or two, the read must never be answered first
            purchase = _request(
                "POST", f"/api/v1/activities/{live['id']}/orders",
                {**headers, "Idempotency-Key": f"k{n}"}, b'{"quantity": 1}',
            )  # fmt: skip
            read = _request("GET", f"/api/v1/activities/{live['id']}", {})
            if n % 2:
                connection.writer.write(purchase + read)
            else:
                connection.writer.write(purchase)
                await asyncio.sleep(0)
                connection.writer.write(read)
            first = await _read_answer(connection.reader)
            second = await _read_answer(connection.reader)
            assert (first.status, second.status) == (202, 200), (n, first, second)
            assert json.loads(second.body)["id"] == live["id"]


async def test_a_connection_served_only_by_the_lane_is_closed_once_idle(
    gateway: Gateway, settings: Settings
) -> None:
    gone = activity_body(stock=0)
    async with _connect(gateway) as connection:
        await _admin(connection, settings, gone)
    async with _connect(gateway) as connection:
        await _warm(connection, gateway)
        answer = await connection.ask(_order(settings, gone["id"]))
        assert answer.status == 409
        assert gateway.routed == []  # the lane's answer
        # keep-alive is 2 s here: the gateway closes the idle connection (EOF), well before 30 s
        assert await asyncio.wait_for(connection.reader.read(), 30) == b""


async def test_with_the_lane_off_aiohttp_answers_every_order(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = activity_body(stock=0)
    async with _start(settings.replace("server", order_lane=False), monkeypatch) as gateway:
        async with _connect(gateway) as connection:
            await _admin(connection, settings, gone)
            await _warm(connection, gateway)
            answer = await connection.ask(_order(settings, gone["id"]))
        assert answer.status == 409
        assert gateway.routed == [f"/api/v1/activities/{gone['id']}/orders"]


async def test_http_1_0_and_closing_requests_are_left_to_aiohttp(
    gateway: Gateway, settings: Settings
) -> None:
    gone = activity_body(stock=0)
    path = f"/api/v1/activities/{gone['id']}/orders"
    async with _connect(gateway) as connection:
        await _admin(connection, settings, gone)
    for extra, version in (({"Connection": "close"}, "1.1"), ({}, "1.0")):
        async with _connect(gateway) as connection:
            await _warm(connection, gateway)
            headers = {**user_headers(settings, "u1", "k1"), **extra}
            request = _request("POST", path, headers, b'{"quantity": 1}', version)
            answer = await connection.ask(request)
            assert answer.status == 409
    assert gateway.routed == [path, path]


async def test_what_arrives_while_the_lane_waits_on_redis_is_answered_after_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, redis_server: EmbeddedRedis
) -> None:
    taken, held = asyncio.Event(), asyncio.Event()
    take, hold = lane.ProtocolLane.take, server.EdgeProtocol._hold

    def taking(self: lane.ProtocolLane, *args: Any) -> Any:
        answered = take(self, *args)
        if isinstance(answered, asyncio.Task):
            taken.set()  # the lane waits on Redis for this one
        return answered

    def holding(self: server.EdgeProtocol, data: bytes) -> None:
        held.set()
        hold(self, data)

    monkeypatch.setattr(lane.ProtocolLane, "take", taking)
    monkeypatch.setattr(server.EdgeProtocol, "_hold", holding)
    live = activity_body(stock=10, per_user_limit=10)
    patient = settings.replace("redis", socket_timeout_s=60.0)  # a stopped Redis is not down
    async with _start(patient, monkeypatch) as gateway, _connect(gateway) as connection:
        await _admin(connection, settings, live)
        await _warm(connection, gateway)
        pid = redis_server._process.pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGSTOP)  # the purchase's script waits until Redis goes on
        try:
            connection.writer.write(_order(settings, live["id"], "h1"))
            await asyncio.wait_for(taken.wait(), 30)
            connection.writer.write(_request("GET", f"/api/v1/activities/{live['id']}", {}))
            await asyncio.wait_for(held.wait(), 30)
        finally:
            os.kill(pid, signal.SIGCONT)
        first = await _read_answer(connection.reader)
        second = await _read_answer(connection.reader)
    assert (first.status, second.status) == (202, 200)
    assert json.loads(first.body)["activity_id"] == json.loads(second.body)["id"] == live["id"]
    assert gateway.routed == []


async def test_while_the_socket_takes_no_more_writes_the_lane_leaves_requests_to_aiohttp(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: a connection holds bounded memory, whatever its client does.

    Sold-out answers need no Redis: a client that sends order POSTs one at a time and never
    reads its answers would have the lane write answer after answer into a buffer that only
    grows. Once the transport says "stop writing" (pause_writing, here called as uvloop calls
    it past the buffer's high-water mark), requests go to aiohttp's loop, which waits for the
    socket to drain and stops reading past its queue.
    """
    protocols: list[server.EdgeProtocol] = []
    made = server.EdgeProtocol.connection_made

    def recording(self: server.EdgeProtocol, transport: asyncio.BaseTransport) -> None:
        protocols.append(self)
        made(self, transport)

    monkeypatch.setattr(server.EdgeProtocol, "connection_made", recording)
    gone = activity_body(stock=0)
    async with _start(settings, monkeypatch) as gateway, _connect(gateway) as connection:
        await _admin(connection, settings, gone)
        await _warm(connection, gateway)
        assert (await connection.ask(_order(settings, gone["id"]))).status == 409
        assert gateway.routed == []  # the lane's
        protocol = protocols[-1]
        protocol.pause_writing()
        connection.writer.write(_order(settings, gone["id"]))
        await connection.writer.drain()
        for _ in range(600):  # aiohttp's loop takes it, and waits for the socket to drain
            if gateway.routed:
                break
            await asyncio.sleep(0.05)
        assert gateway.routed == [f"/api/v1/activities/{gone['id']}/orders"]
        protocol.resume_writing()
        assert (await _read_answer(connection.reader)).status == 409


def test_the_lane_finds_every_aiohttp_internal_it_uses() -> None:
    # a release that renamed one would turn the lane off (with a warning): fail here instead
    assert server.lane_internals_missing() == []


async def test_a_serving_gateway_has_frozen_its_start_up_objects_out_of_the_collector(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    threshold = gc.get_threshold()
    try:
        async with _start(settings, monkeypatch, settle_gc=True):
            # full collections would walk the app and its caches: a stall of every request
            assert gc.get_freeze_count() > 0
            assert gc.get_threshold()[0] == server.GC_YOUNG
    finally:
        gc.unfreeze()  # the test process goes on with its own collector
        gc.set_threshold(*threshold)
