"""Watches every script a Redis runs (MONITOR) and names each key misuse.

On Redis Cluster a script runs on the node of its KEYS' slot: its KEYS must share one slot,
and it must touch no other key (a key it builds itself could live on another node, or in
another slot of the same node, where it fails only once the data is spread). Redis checks
neither on one node, so the contract tests on one node are watched: every EVAL/EVALSHA is
followed in MONITOR's output by the commands the script ran (``[0 lua]``), each of whose keys
must be among the script's KEYS.
"""

from __future__ import annotations

import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import redis
from redis._parsers import CommandsParser  # redis-py's own: the key positions of COMMAND
from redis.crc import key_slot

from seckill import keys
from seckill.scripts import Scripts

_LINE = re.compile(rb"^[0-9.]+ \[\d+ ([^\]]+)\] (.*)$")
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
VELOCITY_PREFIX = f"{keys.PREFIX}:{{rv:".encode()  # keys.velocity()
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def _unescape(quoted: bytes) -> bytes:
    """One MONITOR argument (sdscatrepr's escapes) as the bytes the client sent."""

    def one(match: re.Match[bytes]) -> bytes:
        escaped = match.group(1)
        if escaped.startswith(b"x"):
            return bytes([int(escaped[1:], 16)])
        return _ESCAPES.get(escaped, escaped)

    return re.sub(rb"\\(x[0-9a-fA-F]{2}|.)", one, quoted)


@dataclass
class _Run:
    script: str
    keys: set[bytes]


@dataclass
class ScriptAudit:
    """A MONITOR connection on one Redis, read by a thread, checked at each checkpoint()."""

    port: int
    _lines: list[tuple[bytes, list[bytes]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _names: dict[bytes, str] = field(default_factory=dict)

    def start(self) -> None:
        self._names = {s.sha.encode(): s.name for s in Scripts.from_dir().all()}
        self._client = redis.Redis(port=self.port)
        self._parser = CommandsParser(self._client)  # type: ignore[no-untyped-call]
        self._socket = socket.create_connection(("127.0.0.1", self.port))
        self._socket.sendall(b"MONITOR\r\n")
        self._file = self._socket.makefile("rb")
        assert self._file.readline() == b"+OK\r\n"
        threading.Thread(target=self._read, daemon=True, name="script-audit").start()

    def stop(self) -> None:
        self._socket.close()
        self._client.close()

    def _read(self) -> None:
        for raw in self._file:
            parsed = _LINE.match(raw.rstrip(b"\r\n").removeprefix(b"+"))
            if parsed is not None:
                args = [_unescape(a) for a in _ARG.findall(parsed.group(2))]
                with self._lock:
                    self._lines.append((parsed.group(1), args))

    def checkpoint(self, timeout_s: float = 30.0) -> list[str]:
        """The misuses seen since the last checkpoint (every line up to now read first)."""
        marker = secrets.token_hex(8).encode()
        self._client.echo(marker)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                seen = any(args[-1:] == [marker] for _, args in self._lines[-64:])
                if seen:
                    lines, self._lines = self._lines, []
                    break
            if time.monotonic() > deadline:
                return [f"MONITOR did not show the checkpoint within {timeout_s}s"]
            time.sleep(0.01)
        return self._problems(lines)

    def _problems(self, lines: list[tuple[bytes, list[bytes]]]) -> list[str]:
        problems: list[str] = []
        run: _Run | None = None
        for source, args in lines:
            if not args:
                continue
            command = args[0].upper()
            if source != b"lua":
                run = self._script_run(command, args, problems)
            elif run is not None:
                for key in self._keys(args):
                    if key not in run.keys:
                        problems.append(
                            f"{run.script} touched {key!r} ({command.decode()}), not in its KEYS"
                        )
        return sorted(set(problems))

    def _script_run(self, command: bytes, args: list[bytes], problems: list[str]) -> _Run | None:
        if command not in (b"EVAL", b"EVALSHA") or len(args) < 3:
            return None
        script = self._names.get(args[1], "an inline script") if command == b"EVALSHA" else "EVAL"
        declared = args[3 : 3 + int(args[2])]
        # on one Redis the purchase script also counts velocity, whose counters have tags of
        # their own (Risk.one_call); on a cluster they are counted apart, one call each
        tagged = [k for k in declared if not k.startswith(VELOCITY_PREFIX)] or declared
        if len({key_slot(k) for k in tagged}) > 1:
            problems.append(f"{script}: KEYS in several slots: {declared!r}")
        return _Run(script, set(declared))

    def _keys(self, args: list[bytes]) -> list[bytes]:
        info = self._parser.commands.get(args[0].decode().lower(), {})
        if "pubsub" in info.get("flags", ()):
            return []  # a channel is no key: PUBLISH reaches every node of a cluster
        found = self._parser.get_keys(self._client, *(a.decode("latin-1") for a in args))
        return [k.encode("latin-1") if isinstance(k, str) else k for k in found or []]
