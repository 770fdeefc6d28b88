"""A console left open never holds a gateway up: SIGTERM ends its stream and the drain finishes."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
from pathlib import Path

from seckill import settings as settings_module
from seckill.embedded import EmbeddedRedis, free_port

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
ADMIN_TOKEN = settings_module.load(environ={}).admin.token


def test_a_watched_gateway_still_drains_on_sigterm(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """Invariant: the stream ends with the drain, so no request is left 'in flight' at exit."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "seckill", "serve", "--port", str(port)],
            env={
                **CLEAN_ENV,
                "SECKILL_REDIS_URL": redis_server.url,
                "SECKILL_DEV": "1",
                # long: were the stream to hold the drain, the warning below would be logged
                "SECKILL_SERVER_SHUTDOWN_TIMEOUT_S": "60",
            },
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("seckill serving on")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request(
            "GET", "/admin/v1/live", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        response = connection.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"event: snapshot")  # watching now
        process.send_signal(signal.SIGTERM)
        response.read()  # returns once the gateway ends the stream
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "still in flight" not in log.read_text()
