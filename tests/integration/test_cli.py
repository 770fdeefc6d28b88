"""The seckill command as a person runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jwt

from seckill import settings as settings_module
from tests.helpers import activity_body

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}


def _seckill(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seckill", *args],
        env=env or CLEAN_ENV,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _start_up(cwd: Path) -> subprocess.Popen[str]:
    """`seckill up` on a free port in ``cwd``; its first stdout line is the URL it serves on."""
    return subprocess.Popen(
        [sys.executable, "-m", "seckill", "up", "--port", "0"],
        env=CLEAN_ENV,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _redis_children(parent: int) -> list[str]:
    out = subprocess.run(
        ["ps", "-o", "pid=,comm=", "--ppid", str(parent)], capture_output=True, text=True
    )
    return [line for line in out.stdout.splitlines() if "redis" in line]


def test_up_serves_with_an_embedded_redis_and_stops_cleanly(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "seckill", "up", "--port", "0"],
        env=CLEAN_ENV,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("seckill serving on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert _redis_children(process.pid), "a private redis-server runs as a child"
        assert (tmp_path / "var" / "redis").is_dir(), "its data lives under ./var/"
        settings = settings_module.load(environ={})
        request = urllib.request.Request(
            f"{url}/admin/v1/activities",
            data=json.dumps(activity_body(id="cli1")).encode(),
            headers={"Authorization": f"Bearer {settings.admin.token}"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 201
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0
    assert not _redis_children(process.pid)
    assert (tmp_path / "var" / "redis" / "appendonlydir").is_dir(), "AOF is on"


def test_up_without_redis_server_says_how_to_get_one(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**CLEAN_ENV, "PATH": str(bin_dir)}
    result = _seckill("up", "--port", "0", env=env, cwd=tmp_path)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "redis-server" in message and "SECKILL_REDIS_URL" in message
    assert shutil.which("redis-server"), "the real machine does have one"


def test_a_bad_setting_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    result = _seckill("up", env={**CLEAN_ENV, "SECKILL_SERVER_PORT": "eighty"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "server.port" in result.stderr and "SECKILL_SERVER_PORT" in result.stderr
    assert not (tmp_path / "var").exists(), "nothing was started"


def test_token_is_signed_with_the_configured_secret() -> None:
    secret = "x" * 48
    result = _seckill(
        "token", "alice", "--ttl", "120", env={**CLEAN_ENV, "SECKILL_JWT_SECRET": secret}
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert 100 <= claims["exp"] - time.time() <= 121
    assert _seckill("token", "u" * 65).returncode == 2


def test_serve_without_a_redis_url_refuses() -> None:
    result = _seckill("serve", "--port", "0")
    assert result.returncode == 2 and "SECKILL_REDIS_URL" in result.stderr


def test_sigterm_finishes_the_request_in_flight(tmp_path: Path) -> None:
    import socket

    from seckill.auth import UserAuth

    process = _start_up(tmp_path)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split()[-1]
        host, port = url.removeprefix("http://").split(":")
        settings = settings_module.load(environ={})
        create = urllib.request.Request(
            f"{url}/admin/v1/activities",
            data=json.dumps(activity_body(id="drain")).encode(),
            headers={"Authorization": f"Bearer {settings.admin.token}"},
            method="POST",
        )
        urllib.request.urlopen(create, timeout=5).close()
        token = UserAuth(settings.jwt.secret).mint("late-shopper", 600)
        body = b'{"quantity": 1}'
        head = (
            f"POST /api/v1/activities/drain/orders HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nIdempotency-Key: k1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + body[:5])  # the request is in flight...
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)  # ...when the process is told to stop
            time.sleep(0.5)
            sock.sendall(body[5:])
            answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 202"), answer
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "var" / "orders.db") as db:
        stored = db.execute("SELECT user_id FROM orders WHERE activity_id = 'drain'").fetchall()
    assert stored == [("late-shopper",)], "the writer persisted it before exiting"


def test_serve_with_two_workers_shares_one_port_and_stops_cleanly(
    tmp_path: Path, redis_url: str
) -> None:
    from seckill.embedded import free_port

    port = free_port()
    env = {**CLEAN_ENV, "SECKILL_REDIS_URL": redis_url, "SECKILL_DEV": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "seckill", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(f"seckill serving on http://127.0.0.1:{port}")
        workers = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) >= 2, "two worker processes"
        answered = 0
        deadline = time.monotonic() + 20
        while answered < 20 and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    answered += r.status == 200
            except OSError:
                time.sleep(0.1)  # workers still starting
        assert answered == 20
        # /metrics on either worker shows both, labelled by worker, adding up to the truth
        time.sleep(1.5)  # every worker publishes its figures once a second
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = re.findall(
            r'^seckill_requests_total\{endpoint="healthz",outcome="ok",worker="(\d+)"\} (\S+)$',
            text,
            re.M,
        )
        assert {pid for pid, _ in samples} <= set(workers)
        assert sum(float(value) for _, value in samples) == 20
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0
    assert not list(tmp_path.glob("var/metrics-*")), "the shared directory is cleaned up"


def test_kill_9_of_up_takes_its_private_redis_down(tmp_path: Path) -> None:
    process = _start_up(tmp_path)
    assert process.stdout is not None
    assert process.stdout.readline().startswith("seckill serving on")
    children = _redis_children(process.pid)
    assert children
    redis_pid = int(children[0].split()[0])
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{redis_pid}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{redis_pid}/stat").read_text().split(")")[1].split()[0]
        if state == "Z":  # exited; only its zombie entry waits for a reaper
            break
        time.sleep(0.05)
    alive = (
        Path(f"/proc/{redis_pid}").exists()
        and Path(f"/proc/{redis_pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    )
    assert not alive, "no orphaned redis-server"
