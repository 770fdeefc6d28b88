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
from seckill.topology import Cluster, Sentinels, Topology
from seckill.web.app import create_app
from tests.scriptaudit import ScriptAudit


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One redis-server of our own on a free port (never the shared 6379)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendfsync="no")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis Cluster of our own (3 masters, 1 replica each) for the whole run."""
    with Cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sentinels]:
    """A Sentinel-managed primary of our own (1 replica, 3 sentinels) for the whole run."""
    with Sentinels(tmp_path_factory.mktemp("sentinel")) as sentinels:
        sentinels.start()
        yield sentinels


# The contract (tests marked `contract`) runs on each of these; every other test on one node.
TOPOLOGIES = ("single", "cluster", "sentinel")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--topology",
        action="append",
        choices=TOPOLOGIES,
        help="run the contract tests on this Redis topology only (repeatable; default: all)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "contract: runs on one Redis, a Redis Cluster and a Sentinel primary"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "topology" in metafunc.fixturenames and metafunc.definition.get_closest_marker("contract"):
        chosen = metafunc.config.getoption("--topology") or TOPOLOGIES
        metafunc.parametrize("topology", chosen, indirect=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> Topology | None:
    """The cluster or sentinel setup this test runs on; None for the private single Redis."""
    name = getattr(request, "param", "single")
    if name == "single":
        return None
    fixture = "redis_cluster" if name == "cluster" else "redis_sentinels"
    chosen: Topology = request.getfixturevalue(fixture)
    return chosen


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, topology: Topology | None) -> str:
    """The test's Redis (one node, or the topology of a contract test), emptied first."""
    if topology is not None:
        topology.flush()
        return topology.url
    redis_server: EmbeddedRedis = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def script_audit(redis_server: EmbeddedRedis) -> Iterator[ScriptAudit]:
    """Every script the private Redis runs, watched (tests/scriptaudit.py)."""
    audit = ScriptAudit(redis_server.port)
    audit.start()
    yield audit
    audit.stop()


@pytest.fixture(autouse=True)
def scripts_keep_to_their_keys(request: pytest.FixtureRequest) -> Iterator[None]:
    """Contract tests on one Redis: every script kept to its KEYS, and they share one slot
    (what Redis Cluster needs, and does not check on one node)."""
    callspec = getattr(request.node, "callspec", None)
    on_one_node = callspec is not None and callspec.params.get("topology") == "single"
    if not on_one_node or request.node.get_closest_marker("contract") is None:
        yield
        return
    audit: ScriptAudit = request.getfixturevalue("script_audit")
    audit.checkpoint()  # what ran before this test is not its doing
    yield
    problems = audit.checkpoint()
    assert not problems, "scripts outside their KEYS:\n" + "\n".join(problems)


@pytest.fixture
def sync_redis(
    redis_url: str, topology: Topology | None
) -> Iterator[redis.Redis | redis.RedisCluster]:
    """A synchronous client on the test's Redis (a cluster client on a cluster)."""
    client = redis.Redis.from_url(redis_url) if topology is None else topology.client()
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
