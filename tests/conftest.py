"""Fixtures: a private redis-server for the whole run, settings and the real app per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from seckill import settings as settings_module
from seckill.embedded import EmbeddedRedis
from seckill.settings import Settings
from seckill.web.app import create_app


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One redis-server of our own on a free port (never the shared 6379)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendfsync="no")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The private Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    loaded = settings_module.load(environ=env)
    loaded = loaded.replace("redis", url=redis_url)
    # risk rules off unless a test asks for them (tests/web/test_risk.py)
    loaded = loaded.replace("risk", rules_path=str(Path(__file__).with_name("risk_off.toml")))
    return loaded.replace("server", var_dir=str(tmp_path / "var"))


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient[object, object]]:
    """An HTTP client against the real gateway app."""
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def live_gateway(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real `seckill serve` process sharing the test Redis, on a port the kernel gives it.

    Port 0 and the URL from its first line: a port drawn beforehand could be taken by another
    test worker's server in the meantime, and a health check would then answer for that one.
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env["SECKILL_REDIS_URL"] = redis_server.url
    env["SECKILL_DATA_KEYS"] = "live:" + "A" * 22 + "=="  # addresses are sealed here too
    env["SECKILL_DEV"] = "1"  # the published secrets are for tests like this one
    cwd = tmp_path_factory.mktemp("gateway")
    with (cwd / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "seckill", "serve", "--port", "0"],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("seckill serving on http://"):
        process.kill()
        process.wait(10)
        raise RuntimeError(f"seckill serve did not start: {(cwd / 'serve.log').read_text()}")
    yield line.split()[-1]
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()  # never leave a gateway behind a finished run
        process.wait(10)


POSTGRES_ADMIN_URL = os.environ.get(
    "SECKILL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of our own on the machine's PostgreSQL, dropped at the end of the run."""
    import asyncio
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    import asyncpg

    name = f"seckill_test_{secrets.token_hex(4)}"

    async def execute(statement: str) -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def admin(statement: str) -> None:
        # a thread of its own: the fixture may be set up while the test loop is running
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, execute(statement)).result()

    admin(f'CREATE DATABASE "{name}"')
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    admin(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    """An empty, migrated order store of each kind."""
    from seckill.orders.store import open_store

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'orders.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_store(url)
    await opened.migrate()
    if request.param == "postgres":
        import asyncpg

        connection = await asyncpg.connect(url)
        await connection.execute("TRUNCATE orders, order_events, payment_events, refunds")
        await connection.close()
    opened.url = url  # type: ignore[attr-defined]
    yield opened
    await opened.close()


@pytest.fixture(autouse=True)
async def hang_report() -> AsyncIterator[None]:
    """If a test runs for over 60 s, print every asyncio task's stack: a hang explains itself."""
    import asyncio
    import sys
    import threading

    loop = asyncio.get_running_loop()

    def dump() -> None:
        # pytest captures even fd 2 until the test ends, which a hung test never does: run
        # with -s to see this, or read it from the file it is also written to
        out = sys.__stderr__
        print("\n=== test still running after 60 s; asyncio tasks: ===", file=out)
        with open("tests-hang-report.txt", "a", encoding="utf-8") as report:
            for task in asyncio.all_tasks(loop):
                task.print_stack(file=out)
                task.print_stack(file=report)

    limit = float(os.environ.get("SECKILL_TEST_HANG_S", "60"))
    timer = threading.Timer(limit, lambda: loop.call_soon_threadsafe(dump))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
