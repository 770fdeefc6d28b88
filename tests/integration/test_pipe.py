"""The pipelined connections of the coalesced script calls, against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hiredis
import pytest
import redis
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

from seckill.embedded import EmbeddedRedis
from seckill.pipe import Address, Pipes


def _frames(*commands: tuple[object, ...]) -> bytes:
    return b"".join(hiredis.pack_command(c) for c in commands)  # type: ignore[arg-type]


def _protect(server: EmbeddedRedis) -> None:
    """A password on a running server (EmbeddedRedis checks a fresh one without any)."""
    client = redis.Redis(port=server.port)
    client.config_set("requirepass", "s3cret")
    client.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    _protect(server)
    yield server
    server.stop()


@pytest.fixture
async def pipes(own_redis: EmbeddedRedis) -> AsyncIterator[Pipes]:
    opened = Pipes(
        Address(host="127.0.0.1", port=own_redis.port, password="s3cret", db=3, timeout_s=1.0),
        size=4,
    )
    yield opened
    opened.close()


async def test_many_batches_in_flight_get_their_own_replies_in_order(pipes: Pipes) -> None:
    async def batch(n: int) -> list[object]:
        return await pipes.exchange(
            _frames((b"SET", f"k{n}", n), (b"INCRBY", f"k{n}", n), (b"EVALSHA", "0" * 40, 0)),
            3,
        )

    answers = await asyncio.gather(*(batch(n) for n in range(300)))
    for n, (stored, added, missing) in enumerate(answers):
        assert stored == b"OK"
        assert added == 2 * n
        # an error reply is the exception redis-py would raise, in its place
        assert isinstance(missing, redis_errors.NoScriptError)
    # SELECT 3 was sent when each connection opened: the keys are in db 3 only
    db3 = await pipes.exchange(_frames((b"DBSIZE",)), 1)
    assert db3 == [300]


async def test_the_client_options_are_read_from_a_plain_client(own_redis: EmbeddedRedis) -> None:
    client = Redis.from_url(f"redis://:s3cret@127.0.0.1:{own_redis.port}/2", socket_timeout=1.5)
    found = Pipes.for_client(client, 2)
    assert found is not None
    try:
        assert await found.exchange(_frames((b"SET", "x", "1"), (b"PING",)), 2) == [b"OK", b"PONG"]
        assert await client.get("x") == b"1"  # the same db: 2
    finally:
        found.close()
        await client.aclose()
    tls = Redis.from_url(f"rediss://127.0.0.1:{own_redis.port}/0")
    assert Pipes.for_client(tls, 2) is None  # TLS keeps redis-py's connections
    await tls.aclose()
    # a Sentinel's primary moves (redis-py follows it); made here without connecting
    sentinels = Sentinel([("127.0.0.1", own_redis.port)])  # type: ignore[no-untyped-call]
    sentinel = sentinels.master_for("seckill")
    assert Pipes.for_client(sentinel, 2) is None
    await sentinel.aclose()


async def test_a_wrong_password_fails_the_batch_and_is_not_kept(own_redis: EmbeddedRedis) -> None:
    wrong = Pipes(Address(host="127.0.0.1", port=own_redis.port, password="nope"), size=2)
    for _ in range(2):
        with pytest.raises(redis_errors.AuthenticationError):
            await wrong.exchange(_frames((b"PING",)), 1)
    wrong.close()


async def test_a_redis_that_stops_answering_times_out_and_the_next_batch_reconnects(
    pipes: Pipes, own_redis: EmbeddedRedis
) -> None:
    assert await pipes.exchange(_frames((b"PING",)), 1) == [b"PONG"]
    pid = own_redis._process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(redis_errors.TimeoutError):
            await pipes.exchange(_frames((b"PING",)), 1)
        assert asyncio.get_running_loop().time() - started >= 0.9  # the timeout, not sooner
    finally:
        os.kill(pid, signal.SIGCONT)
    assert await pipes.exchange(_frames((b"PING",)), 1) == [b"PONG"]


async def test_a_restart_fails_the_batches_in_flight_then_serves_again(
    pipes: Pipes, own_redis: EmbeddedRedis
) -> None:
    assert await pipes.exchange(_frames((b"PING",)), 1) == [b"PONG"]
    pid = own_redis._process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    in_flight = asyncio.ensure_future(pipes.exchange(_frames((b"PING",)), 1))
    await asyncio.sleep(0.05)
    own_redis.kill()  # still stopped: the PING is never answered
    with pytest.raises(redis_errors.ConnectionError):
        await in_flight
    with pytest.raises(redis_errors.ConnectionError):
        await pipes.exchange(_frames((b"PING",)), 1)  # down: refused at once
    own_redis.start()
    _protect(own_redis)
    assert await pipes.exchange(_frames((b"PING",)), 1) == [b"PONG"]
