"""A private redis-server for `seckill up`: free loopback port, data under var/, AOF on."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "no redis-server binary found: install one (Debian/Ubuntu: apt-get install redis-server; "
    "macOS: brew install redis) or point seckill at an existing Redis with "
    "SECKILL_REDIS_URL=redis://host:6379/0"
)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when seckill dies, even by SIGKILL (Linux).

    Without this a `kill -9` of `seckill up` would leave its private redis-server running.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """The private redis-server could not be started."""


class _PortTaken(Exception):
    """redis-server could not bind the port drawn for it: someone took it in the meantime."""


_ADDRESS_IN_USE = "Address already in use"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Drawn at random below the kernel's ephemeral range: a port the kernel hands out for
    bind(0) comes from the range where it also puts the local end of outgoing connections, so
    between this call and the server's own bind a busy machine (a load test, a test suite)
    could take it.
    """
    low = _ephemeral_low()
    candidates = range(max(1024, low - 12_000), low)
    for _ in range(64):
        port = random.choice(candidates) if len(candidates) > 100 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            bound: int = sock.getsockname()[1]
            return bound
    raise OSError("no free TCP port found")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


class EmbeddedRedis:
    """Starts and stops one redis-server child process."""

    def __init__(
        self,
        data_dir: Path,
        *,
        appendfsync: str = "everysec",
        port: int = 0,
        maxmemory: str = "1gb",
        config_file: Path | None = None,
        extra_args: Sequence[str] = (),
        pick_port: Callable[[], int] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.port = port
        # a config file Redis may rewrite (a Sentinel's) and options after ours (a cluster
        # node's, a replica's): seckill.topology builds its nodes from these
        self.config_file = config_file
        self.extra_args = tuple(extra_args)
        # how a port is drawn when none is given (a cluster node's bus port must be free too)
        self._pick_port = pick_port or free_port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start redis-server and wait until it answers; returns its URL.

        A port drawn here can still be taken before redis-server binds it (another test
        worker, another server starting at the same moment): then another port is drawn.
        A port given by the caller is tried once.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            raise EmbeddedRedisError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        chosen = self.port
        for _ in range(1 if chosen else 5):
            self.port = chosen or self._pick_port()
            try:
                self._launch(binary, timeout_s)
            except _PortTaken:
                continue
            log.info("embedded redis-server on port %d, data in %s", self.port, self.data_dir)
            return self.url
        raise EmbeddedRedisError(f"redis-server found its port taken; see {self._log}")

    @property
    def _log(self) -> Path:
        return self.data_dir / "redis.log"

    def _launch(self, binary: str, timeout_s: float) -> None:
        command = [
            binary,
            *([str(self.config_file.resolve())] if self.config_file is not None else []),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir.resolve()),
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
            # orders live here until the writer persists them: AOF, not snapshots
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--protected-mode",
            "yes",
            # bounded, and never evicting: a full Redis refuses new orders (503) instead of
            # silently dropping idempotency keys, payment answers or order records
            "--maxmemory",
            self.maxmemory,
            "--maxmemory-policy",
            "noeviction",
            *self.extra_args,
        ]
        logged = self._log.stat().st_size if self._log.exists() else 0
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        # one try per probe: redis-py's default retries (10, with backoff) against whatever
        # else listens on a taken port would outlast the deadline before the exit is seen
        client = redis.Redis(
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                if self._process.poll() is not None:
                    self._process = None
                    if _ADDRESS_IN_USE in self._log_since(logged):
                        raise _PortTaken
                    raise EmbeddedRedisError(f"redis-server exited; see {self._log}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedRedisError(f"redis-server did not answer within {timeout_s}s")
                try:
                    # the one answering must be ours, not a server that won the port
                    if client.info("server")["process_id"] == self._process.pid:
                        break
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                time.sleep(0.05)
        finally:
            client.close()

    def _log_since(self, offset: int) -> str:
        try:
            with self._log.open("rb") as log_file:
                log_file.seek(offset)
                return log_file.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, with no AOF flush (failover tests)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis flushes its AOF on the way out), then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
