"""The edge holds, tried as a hostile client would, against a real `seckill up`.

Stalled bodies, half-sent and oversized header blocks, malformed credentials and dropped
uploads must neither stop the sale for real shoppers nor flood the log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from seckill import settings as settings_module
from seckill.auth import UserAuth
from seckill.embedded import free_port
from tests.helpers import activity_body

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
SETTINGS = settings_module.load(environ={})
ADMIN = {"Authorization": f"Bearer {SETTINGS.admin.token}", "Content-Type": "application/json"}
MAX_IN_FLIGHT = 200
BODY_TIMEOUT_S = 3


@dataclass
class Gateway:
    process: subprocess.Popen[str]
    url: str
    host: str
    port: int
    log: Path

    def rss_kib(self) -> int:
        """The gateway process's resident memory, from /proc (KiB)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert match is not None
        return int(match.group(1))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text: str = response.read().decode()
        return text


def _raise_own_fd_limit(wanted: int = 8192) -> None:
    # the test opens hundreds of sockets at once; the gateway raises its own limit itself
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _start_up(cwd: Path, extra: dict[str, str]) -> Gateway:
    log = cwd / "gateway.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "seckill", "up", "--port", "0"],
            env={**CLEAN_ENV, **extra},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("seckill serving on http://127.0.0.1:"), line
    url = line.split()[-1]
    host, port = url.removeprefix("http://").split(":")
    return Gateway(process, url, host, int(port), log)


def _stop(gateway: Gateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.terminate()
    gateway.process.wait(30)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`seckill up` with short edge deadlines and max_in_flight 200."""
    _raise_own_fd_limit()
    started = _start_up(
        tmp_path_factory.mktemp("edge"),
        {
            "SECKILL_SERVER_HEADER_TIMEOUT_S": "2",
            "SECKILL_SERVER_KEEPALIVE_TIMEOUT_S": "2",
            "SECKILL_SERVER_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "SECKILL_PROTECTION_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
            # every test client is 127.0.0.1: the per-address cap is tested on its own
            "SECKILL_SERVER_MAX_CONNECTIONS_PER_PEER": "4096",
            "SECKILL_SERVER_MAX_CONNECTIONS": "8192",
        },
    )
    yield started
    _stop(started)


def _create_activity(url: str, **overrides: object) -> str:
    body = activity_body(**overrides)
    request = urllib.request.Request(
        f"{url}/admin/v1/activities", data=json.dumps(body).encode(), headers=ADMIN, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
    return str(body["id"])


async def _answer(reader: asyncio.StreamReader, limit_s: float = 30.0) -> bytes:
    """Everything the gateway sends until it closes (b"" when it just closed or reset)."""
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return b"".join(chunks)


async def _open(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(gateway.host, gateway.port)


async def _request(gateway: Gateway, raw: bytes) -> bytes:
    reader, writer = await _open(gateway)
    writer.write(raw)
    await writer.drain()
    try:
        return await _answer(reader)
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(match.group(1)) if match else 0


async def test_stalled_bodies_hold_no_slot_and_are_closed_by_the_body_deadline(
    gateway: Gateway,
) -> None:
    activity = _create_activity(gateway.url, id="edge-stall", stock=100_000)
    auth = UserAuth(SETTINGS.jwt.secret)
    staller = auth.mint("staller", 600).encode()
    signature = f"t={int(time.time())},v1={'0' * 64}".encode()
    heads = [
        b"POST /api/v1/payments/notify HTTP/1.1\r\nHost: x\r\nSeckill-Signature: "
        + signature
        + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ] * 300 + [
        b"POST /api/v1/activities/" + activity.encode() + b"/orders HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + staller + b"\r\nIdempotency-Key: stall\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ] * 300
    stalled = []
    for head in heads:
        reader, writer = await _open(gateway)
        writer.write(head)  # the headers, then nothing: 600 bodies that never come
        stalled.append((reader, writer))
    answers = [asyncio.ensure_future(_answer(reader)) for reader, _ in stalled]

    statuses: list[int] = []
    held_while_buying: list[int] = []
    async with aiohttp.ClientSession() as session:
        buyer = 0
        while not all(answer.done() for answer in answers) or buyer < 20:
            held_while_buying.append(sum(not answer.done() for answer in answers))
            headers = {
                "Authorization": f"Bearer {auth.mint(f'buyer{buyer}', 600)}",
                "Idempotency-Key": f"k{buyer}",
            }
            async with session.post(
                f"{gateway.url}/api/v1/activities/{activity}/orders",
                json={"quantity": 1},
                headers=headers,
            ) as response:
                statuses.append(response.status)
            buyer += 1
            await asyncio.sleep(0.02)

    assert set(statuses) == {202}, "real purchases got 202 throughout"
    assert max(held_while_buying) > MAX_IN_FLIGHT, "bought while more stalled than max_in_flight"
    got = [await answer for answer in answers]
    # each stalled request was answered 408 request_timeout (or closed) by the body deadline
    assert all(_status(answer) in (408, 0) for answer in got)
    assert sum(_status(answer) == 408 for answer in got[:300]) > 0, "payment callback: 408"
    assert sum(_status(answer) == 408 for answer in got[300:]) > 0, "order POST: 408"
    assert b'"request_timeout"' in next(a for a in got if _status(a) == 408)
    for _, writer in stalled:
        writer.close()


async def test_half_sent_headers_are_closed_by_the_header_deadline(gateway: Gateway) -> None:
    opened = []
    for n in range(300):
        reader, writer = await _open(gateway)
        writer.write(b"GET /api/v1/activities/x HTTP/1.1\r\nHost: x\r\nX-Half-%d: " % n)
        opened.append((reader, writer))
    # the default keep-alive timer would keep these for an hour: every one must be closed
    got = await asyncio.gather(*(_answer(reader, 30.0) for reader, _ in opened))
    assert all(_status(answer) in (0, 408) for answer in got)
    for _, writer in opened:
        writer.close()
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/healthz") as r:
        assert r.status == 200, "the gateway still serves"
    assert 'reason="header_timeout"' in gateway.metrics()


async def test_an_idle_keep_alive_connection_is_closed_by_the_keepalive_deadline(
    gateway: Gateway,
) -> None:
    idle = []
    for n in range(20):
        reader, writer = await _open(gateway)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"close" not in head.lower()
        if n % 2:  # half of them start a second request and never finish its headers
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ")
        idle.append((reader, writer))
    # aiohttp's default would keep them for an hour: the configured 2 s closes every one
    rest = await asyncio.gather(*(_answer(reader, 30.0) for reader, _ in idle))
    assert all(_status(answer) == 0 for answer in rest)
    for _, writer in idle:
        writer.close()


async def _flood(gateway: Gateway, shape: int) -> bytes:
    """One request with ~1 MB of headers: many small fields, or few near the field limit."""
    reader, writer = await _open(gateway)
    if shape == 0:
        lines = [b"X-Fill-%d: %s\r\n" % (n, b"a" * 1000) for n in range(1000)]
    else:
        lines = [b"X-Fill-%d: %s\r\n" % (n, b"b" * 4000) for n in range(250)]
    try:
        writer.write(b"GET /api/v1/activities/x HTTP/1.1\r\nHost: x\r\n")
        for line in lines:
            writer.write(line)
            await writer.drain()
        writer.write(b"\r\n")
        await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        return await _answer(reader)
    finally:
        writer.close()


async def test_a_flood_of_megabyte_headers_gets_431_or_closed_and_costs_little_memory(
    gateway: Gateway,
) -> None:
    before = gateway.rss_kib()
    peak = before
    floods = [asyncio.ensure_future(_flood(gateway, n % 2)) for n in range(150)]
    while not all(flood.done() for flood in floods):
        peak = max(peak, gateway.rss_kib())
        await asyncio.sleep(0.05)
    got = [await flood for flood in floods]
    peak = max(peak, gateway.rss_kib())
    assert all(_status(answer) in (431, 0) for answer in got), {_status(a) for a in got}
    assert (peak - before) < 50 * 1024, f"RSS grew {(peak - before) // 1024} MiB"

    # a flood's 431 can be lost to the reset of a socket still sending; a client that sends a
    # header block just over the budget, all at once, reads the contract's answer
    reader, writer = await _open(gateway)
    filler = b"".join(b"X-Fill-%d: %s\r\n" % (n, b"c" * 1000) for n in range(12))
    writer.write(b"GET /api/v1/activities/x HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n")
    await writer.drain()
    try:
        answer = await _answer(reader)
    finally:
        writer.close()
    assert _status(answer) == 431 and b'"headers_too_large"' in answer, answer[:200]


async def test_every_malformed_credential_is_a_401_and_no_traceback(gateway: Gateway) -> None:
    now = str(int(time.time())).encode()
    notify = (
        b"POST /api/v1/payments/notify HTTP/1.1\r\nHost: x\r\nSeckill-Signature: %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    cases = {
        "non-ASCII v1": notify % (b"t=" + now + b",v1=" + "é".encode() * 32),
        "400-digit t": notify % (b"t=" + b"9" * 400 + b",v1=" + b"0" * 64),
        "non-UTF-8 v1": notify % (b"t=" + now + b",v1=\xff\xfe"),
        "no t": notify % (b"v1=" + b"0" * 64),
        "admin non-UTF-8": b"GET /admin/v1/flags HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff\xfe\xfd\r\n\r\n",
        "admin non-ASCII": "GET /admin/v1/flags HTTP/1.1\r\nHost: x\r\n"
        "Authorization: Bearer ééé\r\n\r\n".encode(),
        "user non-UTF-8": b"GET /api/v1/orders/a.00000000000000000000 HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff.\xfe.\xfd\r\n\r\n",
        "user non-ASCII": "GET /api/v1/orders/a.00000000000000000000 HTTP/1.1\r\nHost: x\r\n"
        "Authorization: Bearer é.é.é\r\n\r\n".encode(),
    }
    for name, raw in cases.items():
        answer = await _request(gateway, raw)
        assert _status(answer) == 401, (name, answer[:200])
        assert b'"unauthorized"' in answer, name
    # a path with a newline in it cannot forge a log line
    answer = await _request(
        gateway, b"GET /api/v1/activities/x%0aFORGED%0d%0aFORGED HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert _status(answer) == 404
    log = gateway.log.read_text(errors="replace")
    assert "Traceback" not in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())


async def test_a_dropped_upload_is_counted_client_closed(gateway: Gateway) -> None:
    activity = _create_activity(gateway.url, id="edge-drop")
    token = UserAuth(SETTINGS.jwt.secret).mint("dropper", 600).encode()
    for n in range(3):
        _, writer = await _open(gateway)
        writer.write(
            b"POST /api/v1/activities/" + activity.encode() + b"/orders HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token + b"\r\nIdempotency-Key: drop%d\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"quan' % n
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is waiting for the rest of the body...
        writer.close()  # ...when the phone loses its connection
        await writer.wait_closed()
    pattern = re.compile(
        r'^seckill_requests_total\{endpoint="order_create",outcome="client_closed"\} (\S+)$', re.M
    )
    deadline = time.monotonic() + 20
    while True:
        text = gateway.metrics()
        found = pattern.search(text)
        if (found and float(found.group(1)) >= 3) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert found and float(found.group(1)) >= 3, "each dropped upload counted client_closed"
    assert 'endpoint="order_create",outcome="internal"' not in text
    assert "Traceback" not in gateway.log.read_text(errors="replace")


def _seckill(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seckill", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", ["serve", "writer"])
def test_the_published_secrets_stop_serve_and_writer(
    command: str, redis_url: str, tmp_path: Path
) -> None:
    env = {**CLEAN_ENV, "SECKILL_REDIS_URL": redis_url}
    args = [command, "--port", "0"] if command == "serve" else [command]
    result = _seckill(*args, env=env, cwd=tmp_path)
    assert result.returncode != 0
    line = result.stderr.strip()
    assert line.count("\n") == 0, line
    assert "jwt.secret" in line and "SECKILL_JWT_SECRET" in line and "development" in line
    # one real secret is not enough: the next published one is named
    result = _seckill(*args, env={**env, "SECKILL_JWT_SECRET": secrets.token_hex(24)}, cwd=tmp_path)
    assert result.returncode != 0 and "admin.token" in result.stderr
    short = {
        "SECKILL_JWT_SECRET": secrets.token_hex(24),
        "SECKILL_ADMIN_TOKEN": secrets.token_hex(24),
        "SECKILL_PAYMENT_SECRET": "s" * 20,
    }
    result = _seckill(*args, env={**env, **short}, cwd=tmp_path)
    assert result.returncode != 0 and "payment.secret" in result.stderr


def test_serve_with_real_secrets_serves(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **CLEAN_ENV,
        "SECKILL_REDIS_URL": redis_url,
        "SECKILL_JWT_SECRET": secrets.token_hex(24),
        "SECKILL_ADMIN_TOKEN": secrets.token_hex(24),
        "SECKILL_PAYMENT_SECRET": secrets.token_hex(24),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "seckill", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("seckill serving on")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        process.terminate()
        assert process.wait(30) == 0


def test_up_on_a_public_address_follows_the_serve_rule(tmp_path: Path) -> None:
    result = _seckill("up", "--host", "0.0.0.0", "--port", "0", env=CLEAN_ENV, cwd=tmp_path)
    assert result.returncode != 0 and "jwt.secret" in result.stderr
    assert not (tmp_path / "var").exists()


def test_up_on_loopback_says_it_is_in_development_mode(tmp_path: Path) -> None:
    started = _start_up(tmp_path, {})
    try:
        with urllib.request.urlopen(f"{started.url}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        _stop(started)
    lines = [line for line in started.log.read_text().splitlines() if "development mode" in line]
    assert len(lines) == 1


def test_the_ops_listener_serves_metrics_and_readyz_instead_of_the_public_port(
    tmp_path: Path,
) -> None:
    ops_port = free_port()
    started = _start_up(tmp_path, {"SECKILL_SERVER_OPS_PORT": str(ops_port)})
    try:
        for path in ("/metrics", "/readyz", "/healthz"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{started.url}{path}", timeout=10)
            assert refused.value.code == 404, path
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}{path}", timeout=10) as r:
                assert r.status == 200, path
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=10) as r:
            assert b"seckill_connections_open" in r.read()
    finally:
        _stop(started)


async def test_connections_are_capped_per_address_and_in_total(tmp_path: Path) -> None:
    started = _start_up(
        tmp_path,
        {
            "SECKILL_SERVER_MAX_CONNECTIONS_PER_PEER": "4",
            "SECKILL_SERVER_MAX_CONNECTIONS": "6",
            "SECKILL_SERVER_HEADER_TIMEOUT_S": "60",
        },
    )
    ping = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

    async def connect(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(started.host, started.port, local_addr=(source, 0))

    async def answered(pair: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
        reader, writer = pair
        writer.write(ping)
        try:
            async with asyncio.timeout(30):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            return False
        return head.startswith(b"HTTP/1.1 200")

    try:
        first = [await connect("127.0.0.1") for _ in range(4)]
        over_peer = await connect("127.0.0.1")
        assert not await answered(over_peer), "a fifth connection from one address is closed"
        second = [await connect("127.0.0.2") for _ in range(2)]
        over_total = await connect("127.0.0.2")
        assert not await answered(over_total), "a seventh connection in all is closed"
        for pair in first + second:
            assert await answered(pair), "the connections within the caps are served"
        for _, writer in [*first, *second, over_peer, over_total]:
            writer.close()
    finally:
        _stop(started)
