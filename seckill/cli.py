"""The `seckill` command."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seckill import __version__, connections, resources
from seckill import settings as settings_module
from seckill.auth import UserAuth
from seckill.embedded import EmbeddedRedis, EmbeddedRedisError
from seckill.settings import Settings, SettingsError, redact

if TYPE_CHECKING:
    from seckill.connections import Client
    from seckill.orders.store import OrderStore

log = logging.getLogger("seckill")


def _announce(url: str) -> None:
    print(f"seckill serving on {url}", flush=True)


def _with_listen(settings: Settings, args: argparse.Namespace) -> Settings:
    changes = {}
    if args.host is not None:
        changes["host"] = args.host
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise SettingsError("invalid --port: must be 0..65535")
        changes["port"] = args.port
    return settings.replace("server", **changes) if changes else settings


# outside development every secret is at least this long (HS256 key strength)
_SECRET_MIN = 32


def _published_secret(settings: Settings) -> str | None:
    """The first secret that is a published development value or too short, as a message."""
    published = settings_module.load(resources.config_path(), environ={})
    for key, value, default in (
        ("jwt.secret", settings.jwt.secret, published.jwt.secret),
        ("admin.token", settings.admin.token, published.admin.token),
        ("payment.secret", settings.payment.secret, published.payment.secret),
    ):
        env = "SECKILL_" + key.replace(".", "_").upper()
        if value.startswith("dev-only-") or value == default:
            return f"{key} ({env}) is the published development value"
        if len(value) < _SECRET_MIN:
            return f"{key} ({env}) is shorter than {_SECRET_MIN} characters"
    return None


def _refuse_published_secrets(settings: Settings, command: str) -> bool:
    """True (and one line on stderr) when ``command`` must not start with these secrets."""
    problem = _published_secret(settings)
    if problem is None:
        return False
    if os.environ.get("SECKILL_DEV") == "1":
        log.warning("development mode (SECKILL_DEV=1): %s", problem)
        return False
    print(
        f"seckill: {command} refuses to start: {problem}; set a real secret "
        "(or SECKILL_DEV=1 for development)",
        file=sys.stderr,
    )
    return True


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _evicting_redis(settings: Settings) -> bool:
    """True (after printing one line) when the configured Redis may evict keys."""
    from seckill import eviction

    refusal = eviction.check(settings)
    if refusal is not None:
        print(f"seckill: {refusal}", file=sys.stderr)
        return True
    return False


def _wechatpay_checked() -> bool:
    """SECKILL_WECHATPAY_* read and checked now (SettingsError: one line, exit 2); True if set.

    Each problem is one line naming the variable; no secret is ever printed.
    """
    from seckill.payments.wechatpay import WechatPayConfig

    config = WechatPayConfig.from_env()
    if config is not None:
        log.info("%s", config.describe())
    return config is not None


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Everything on one machine: embedded Redis (unless SECKILL_REDIS_URL), gateway, writer,
    expiry sweeper; orders go to SQLite under var/ unless SECKILL_DATABASE_URL."""
    from seckill import server

    settings = _with_listen(settings, args)
    if _loopback(settings.server.host):
        # one command on a laptop: the published secrets are fine where nobody else can reach
        if _published_secret(settings) is not None:
            log.warning("development mode: listening on loopback only, published secrets allowed")
    elif _refuse_published_secrets(settings, "up"):
        return 2
    server.raise_open_files_limit()
    settings = _dev_data_keys(settings)
    fake_wechatpay = bool(getattr(args, "fake_wechatpay", False))
    if fake_wechatpay:
        if not _loopback(settings.server.host):
            print(
                "seckill: --fake-wechatpay is for one machine: use a loopback --host",
                file=sys.stderr,
            )
            return 2
    else:
        _wechatpay_checked()
    embedded: EmbeddedRedis | None = None
    if not settings.redis.url:
        embedded = EmbeddedRedis(
            Path(settings.server.var_dir) / "redis",
            appendfsync=settings.redis.appendfsync,
            maxmemory=settings.redis.maxmemory,
        )
        try:
            url = embedded.start()
        except EmbeddedRedisError as exc:
            print(f"seckill: {exc}", file=sys.stderr)
            return 1
        settings = settings.replace("redis", url=url)
        # ops tools started beside `up` (reconcile, flags) find this Redis through the file
        _url_file(settings).write_text(url + "\n", encoding="utf-8")
    elif _evicting_redis(settings):
        return 1
    try:
        problem = _data_key_problem(settings)
        if problem:
            print(f"seckill: {problem}", file=sys.stderr)
            return 2
        return server.serve(settings, 1, _announce, with_orders=True, fake_wechatpay=fake_wechatpay)
    finally:
        if embedded is not None:
            embedded.stop()
            _url_file(settings).unlink(missing_ok=True)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """The gateway only (stateless; run many)."""
    from seckill import server

    settings = _with_listen(settings, args)
    if not settings.redis.url:
        print(
            "seckill: serve needs SECKILL_REDIS_URL (use `seckill up` for an embedded one)",
            file=sys.stderr,
        )
        return 2
    workers = args.workers if args.workers is not None else settings.server.workers
    if not 1 <= workers <= 256:
        print("seckill: --workers must be 1..256", file=sys.stderr)
        return 2
    if _refuse_published_secrets(settings, "serve"):
        return 2
    if _evicting_redis(settings):
        return 1
    _wechatpay_checked()
    server.raise_open_files_limit()
    problem = _data_key_problem(settings)
    if problem:
        print(f"seckill: {problem}", file=sys.stderr)
        return 2
    return server.serve(settings, workers, _announce)


def _url_file(settings: Settings) -> Path:
    return Path(settings.server.var_dir) / "redis.url"


def _redis_settings(settings: Settings) -> Settings | None:
    """Settings with a Redis URL: configured, or the one a local `seckill up` left in var/."""
    if settings.redis.url:
        return settings
    try:
        url = _url_file(settings).read_text(encoding="utf-8").strip()
    except OSError:
        print(
            "seckill: no Redis: set SECKILL_REDIS_URL, or run this beside a `seckill up`",
            file=sys.stderr,
        )
        return None
    return settings.replace("redis", url=url)


def _on_redis(
    settings: Settings,
    activity_id: str | None,
    command: Callable[[Client], Coroutine[Any, Any, int]],
    unreachable: int = 1,
) -> int:
    """Run an ops command's coroutine on a Redis client (closed afterwards): exit 2 without a
    Redis URL or with a malformed activity id, ``unreachable`` when Redis does not answer."""
    import asyncio

    from seckill import keys
    from seckill.errors import RedisUnavailable
    from seckill.scripts import CONNECTION_ERRORS
    from seckill.web.app import redis_client

    resolved = _redis_settings(settings)
    if resolved is None:
        return 2
    if activity_id is not None and not keys.ID_PATTERN.fullmatch(activity_id):
        print(f"seckill: not an activity id: {activity_id!r}", file=sys.stderr)
        return 2

    async def run() -> int:
        client = redis_client(resolved)
        try:
            return await command(client)
        finally:
            await connections.close(client)

    try:
        return asyncio.run(run())
    except (*CONNECTION_ERRORS, RedisUnavailable) as exc:  # type: ignore[misc]
        print(f"seckill: Redis unreachable: {redact(str(exc))}", file=sys.stderr)
        return unreachable


@contextlib.asynccontextmanager
async def _connected(settings: Settings) -> AsyncIterator[tuple[Client, OrderStore]]:
    """A Redis client and the order store for a command; both closed afterwards."""
    from seckill.orders.store import open_store
    from seckill.web.app import redis_client

    client = redis_client(settings)
    store = open_store(settings.database_url)
    try:
        yield client, store
    finally:
        await store.close()
        await connections.close(client)


def cmd_writer(settings: Settings, args: argparse.Namespace) -> int:
    """The order writer + expiry sweeper only (run one or more; they share a consumer group)."""
    import asyncio
    import signal

    import uvloop
    from prometheus_client import start_http_server

    from seckill.metrics import Metrics
    from seckill.orders.service import OrderService

    if _refuse_published_secrets(settings, "writer"):
        return 2
    resolved = _redis_settings(settings)
    if resolved is None:
        return 2
    settings = resolved
    if _evicting_redis(settings):
        return 1
    problem = _data_key_problem(settings)
    if problem:
        print(f"seckill: {problem}", file=sys.stderr)
        return 2
    _wechatpay_checked()

    async def run() -> None:
        from seckill.payments.wechatpay import WechatPay, WechatPayConfig

        config = WechatPayConfig.from_env()
        provider = WechatPay(config) if config is not None else None
        try:
            async with _connected(settings) as (client, store):
                await serve_orders(client, store, provider)
        finally:
            if provider is not None:
                await provider.aclose()

    async def serve_orders(client: Client, store: OrderStore, provider: Any) -> None:
        service = OrderService(settings, client, store, provider)
        if settings.writer.metrics_port:
            metrics = Metrics()
            metrics.add_writer(service.writer, service.sweeper)
            metrics.add_loops(service.supervisors)
            metrics.add_payments(service)
            start_http_server(settings.writer.metrics_port, registry=metrics.registry)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # SIGTERM: finish the batch in hand, acknowledge it, exit 0
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(Exception):  # Redis away at start: the loop claims it later
            await service.writer.slot.claim()
        print(f"seckill writer {service.writer.consumer} running", flush=True)
        await service.run(stop)

    uvloop.run(run())
    return 0


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """Print the invariant report as JSON; exit 0 when consistent, 1 when not."""
    import asyncio
    import json

    from seckill import report
    from seckill.orders.store import StoreUnavailable
    from seckill.scripts import CONNECTION_ERRORS

    resolved = _redis_settings(settings)
    if resolved is None:
        return 2
    settings = resolved

    async def run() -> dict[str, object] | None:
        async with _connected(settings) as (client, store):
            return await report.build(client, store, args.activity_id)

    try:
        body = asyncio.run(run())
    except (StoreUnavailable, *CONNECTION_ERRORS) as exc:  # type: ignore[misc]
        print(f"seckill: cannot reconcile: {redact(str(exc))}", file=sys.stderr)
        return 2
    if body is None:
        print(f"seckill: no activity {args.activity_id!r}", file=sys.stderr)
        return 2
    print(json.dumps(body, indent=2))
    return 0 if body["consistent"] else 1


def cmd_flags(settings: Settings, args: argparse.Namespace) -> int:
    """`flags list` / `flags set NAME VALUE [--ttl S]`: the same effect as the admin API."""
    import asyncio
    import getpass
    import json

    from seckill.errors import InvalidRequest
    from seckill.scripts import CONNECTION_ERRORS, Scripts
    from seckill.switches import Switches
    from seckill.web.app import redis_client

    resolved = _redis_settings(settings)
    if resolved is None:
        return 2
    settings = resolved

    async def run() -> object:
        client = redis_client(settings)
        switches = Switches(client, Scripts.from_dir())
        try:
            if args.action == "list":
                await switches.load()
                return {"flags": switches.all()}
            try:
                value = json.loads(args.value)
            except json.JSONDecodeError:
                value = args.value  # a bare word is a string
            return await switches.set(args.name, value, args.ttl, f"cli:{getpass.getuser()}")
        finally:
            await connections.close(client)

    try:
        print(json.dumps(asyncio.run(run()), indent=2))
    except InvalidRequest as exc:
        print(f"seckill: {exc.message}", file=sys.stderr)
        return 2
    except CONNECTION_ERRORS as exc:
        print(f"seckill: Redis unreachable: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    """Print a user JWT signed with the configured secret."""
    ttl = args.ttl if args.ttl is not None else settings.jwt.default_ttl_s
    if not 0 < ttl <= settings.jwt.max_lifetime_s:
        print(
            f"seckill: --ttl must be 1..{settings.jwt.max_lifetime_s} seconds (jwt.max_lifetime_s)",
            file=sys.stderr,
        )
        return 2
    try:
        print(
            UserAuth(settings.jwt.secret).mint(
                args.user_id, ttl, args.tier or "", args.openid or ""
            )
        )
    except ValueError as exc:
        print(f"seckill: {exc}", file=sys.stderr)
        return 2
    return 0


def _dev_data_keys(settings: Settings) -> Settings:
    from seckill import datakeys

    return datakeys.with_dev_keys(settings, _loopback(settings.server.host))


def _data_key_problem(settings: Settings) -> str | None:
    from seckill import datakeys

    return datakeys.startup_problem(settings)


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """`keys new KID` prints a fresh key; `keys rotate` re-encrypts stored orders."""
    import asyncio
    import json

    from seckill import personal
    from seckill.orders.store import StoreUnavailable, open_store
    from seckill.rotation import rotate

    if args.action == "new":
        try:
            print(personal.new_key(args.kid, settings.data.cipher))
        except personal.DataKeyError as exc:
            print(f"seckill: {exc}", file=sys.stderr)
            return 2
        return 0
    data = settings.data
    if not data.keys.strip():
        print("seckill: keys rotate needs SECKILL_DATA_KEYS (the new key first)", file=sys.stderr)
        return 2
    if not 1 <= args.batch <= 10_000:
        print("seckill: --batch must be 1..10000", file=sys.stderr)
        return 2
    sealer = personal.Sealer(data.keys, data.cipher, data.hash_key)

    async def run() -> dict[str, object]:
        store = open_store(settings.database_url)
        try:
            await store.migrate()
            return await rotate(store, sealer, args.after, args.batch)
        finally:
            await store.close()

    try:
        summary = asyncio.run(run())
    except StoreUnavailable as exc:
        print(f"seckill: order store unavailable ({exc}); run again to resume", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0 if not summary["failed"] else 1


def cmd_deadletters(settings: Settings, args: argparse.Namespace) -> int:
    """`deadletters list|replay ACTIVITY_ID`: show the entries parked for a person, or re-queue
    them to the stream they came from (as new entries, written again by the writers)."""
    import json

    from seckill import buckets, keys
    from seckill.orders import deadletters

    async def command(client: Client) -> int:
        spaces = await buckets.spaces_of(client, args.activity_id)  # a bucketed one's buckets
        if args.action == "list":
            # JSON lines: one dead letter each (id, origin, reason, attempts, summary)
            for space in spaces:
                cursor = "-"
                while True:
                    page: Any = await client.xrange(
                        keys.dead_letters(space), min=cursor, max="+", count=500
                    )
                    for dead_id, fields in page:
                        entry = deadletters.describe(dead_id.decode(), dict(fields))
                        print(json.dumps(entry, sort_keys=True))
                    if len(page) < 500:
                        break
                    cursor = "(" + page[-1][0].decode()
            return 0
        replayed, refused = 0, list[str]()
        for space in spaces:
            done, failed = await deadletters.replay(client, space)
            replayed, refused = replayed + done, refused + failed
        print(json.dumps({"activity_id": args.activity_id, "replayed": replayed}))
        for line in refused:
            print(f"seckill: not replayed: {line}", file=sys.stderr)
        return 1 if refused else 0

    return _on_redis(settings, args.activity_id, command)


def cmd_refunds(settings: Settings, args: argparse.Namespace) -> int:
    """`refunds list [ACTIVITY_ID]` as JSON lines; `refunds retry ACTIVITY_ID [--order ID]`
    puts refunds that need a person (or wait for a later try) back on the refunder's queue now;
    the running writer's refunder asks again with the same refund number (never a second
    refund)."""
    import json

    from seckill import buckets
    from seckill.payments.ledger import Ledger
    from seckill.scripts import Scripts

    async def command(client: Client) -> int:
        ledger = Ledger(client, Scripts.from_dir())
        # the key spaces holding refunds: the activity's and, when bucketed, its buckets'
        if args.activity_id is None:
            spaces = await buckets.key_spaces(client)
        else:
            spaces = await buckets.spaces_of(client, args.activity_id)
        records = [record for space in spaces for record in await ledger.refunds(space)]
        if args.action == "list":
            for record in records:
                print(json.dumps(record.public(), sort_keys=True, ensure_ascii=False))
            return 0
        now_ms = int(1000 * (await client.time())[0])
        retried = 0
        for record in records:
            if args.order and record.order_id != args.order:
                continue
            if record.status == "refunded":
                continue
            # attention goes back to pending (asked again: same refund number); pending
            # and processing are simply tried now
            status = "pending" if record.status == "attention" else record.status
            after = record.moved(status=status, reason="retried by ops")
            if await ledger.move_refund(record, after, now_ms):
                retried += 1
        print(json.dumps({"activity_id": args.activity_id, "retried": retried}))
        return 0

    return _on_redis(settings, args.activity_id, command)


def cmd_draw(settings: Settings, args: argparse.Namespace) -> int:
    """`draw verify ACTIVITY_ID [--seed HEX]`: recompute a lottery's order from its seed and
    registrants and check it against the commitment and the order in force; exit 0 when it
    holds, 1 when not, 2 when there is nothing to verify (or Redis does not answer)."""
    import json

    from seckill import lottery
    from seckill.scripts import Scripts

    async def command(client: Client) -> int:
        drawer = lottery.Lottery(client, Scripts.from_dir())
        stored = await drawer.read(args.activity_id)
        if stored is None:
            print(f"seckill: activity {args.activity_id!r} has no lottery", file=sys.stderr)
            return 2
        if args.seed:
            stored = dataclasses.replace(stored, seed=args.seed)
        registrants = await drawer.registrants(args.activity_id)
        placed = await drawer.placed(args.activity_id)
        found = lottery.problems(stored, registrants, placed)
        print(
            json.dumps(
                {
                    "activity_id": args.activity_id,
                    "commitment": stored.commitment,
                    "registrants": len(registrants),
                    "order_digest": stored.digest,
                    "verified": not found,
                    "problems": found,
                },
                indent=2,
            )
        )
        for problem in found:
            print(f"seckill: draw not verified: {problem}", file=sys.stderr)
        return 1 if found else 0

    return _on_redis(settings, args.activity_id, command, unreachable=2)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="seckill", description="Flash-sale gateway.")
    root.add_argument("--version", action="version", version=f"seckill {__version__}")
    root.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="gateway + embedded Redis on one machine")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument(
        "--fake-wechatpay",
        action="store_true",
        help="run a local WeChat Pay beside the gateway, wired to it (development)",
    )
    up.set_defaults(run=cmd_up)

    serve = commands.add_parser("serve", help="the gateway only (stateless; run many)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(run=cmd_serve)

    writer = commands.add_parser("writer", help="the order writer + expiry sweeper only")
    writer.set_defaults(run=cmd_writer)

    reconcile = commands.add_parser(
        "reconcile", help="compare Redis and the store; exit 1 on drift"
    )
    reconcile.add_argument("activity_id")
    reconcile.set_defaults(run=cmd_reconcile)

    flags = commands.add_parser("flags", help="read or flip degradation flags")
    flag_actions = flags.add_subparsers(dest="action", required=True, metavar="ACTION")
    flag_actions.add_parser("list", help="every flag and its value")
    flag_set = flag_actions.add_parser("set", help="set NAME to VALUE (JSON: true, 0.5, ...)")
    flag_set.add_argument("name")
    flag_set.add_argument("value")
    flag_set.add_argument("--ttl", type=int, help="seconds, then the flag returns by itself")
    flags.set_defaults(run=cmd_flags)

    dead = commands.add_parser("deadletters", help="list or replay an activity's dead letters")
    dead_actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    dead_list = dead_actions.add_parser("list", help="one JSON line per dead letter")
    dead_list.add_argument("activity_id")
    dead_replay = dead_actions.add_parser("replay", help="put them back on their streams")
    dead_replay.add_argument("activity_id")
    dead.set_defaults(run=cmd_deadletters)

    refunds = commands.add_parser("refunds", help="refunds of payments that came too late")
    refund_actions = refunds.add_subparsers(dest="action", required=True, metavar="ACTION")
    refund_list = refund_actions.add_parser("list", help="one JSON line per refund")
    refund_list.add_argument("activity_id", nargs="?", help="one activity (default: all)")
    refund_retry = refund_actions.add_parser(
        "retry", help="ask again for refunds that need a person (or wait for their next try)"
    )
    refund_retry.add_argument("activity_id")
    refund_retry.add_argument("--order", help="only this order's refund")
    refunds.set_defaults(run=cmd_refunds)

    draw = commands.add_parser("draw", help="a lottery's draw")
    draw_actions = draw.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = draw_actions.add_parser(
        "verify", help="recompute the order from the seed and registrants; exit 0 if it holds"
    )
    verify.add_argument("activity_id")
    verify.add_argument("--seed", help="check this seed instead of the stored one (hex)")
    draw.set_defaults(run=cmd_draw)

    token = commands.add_parser("token", help="print a user JWT for testing")
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, help="seconds (default: jwt.default_ttl_s)")
    token.add_argument("--tier", help="member tier claim (an activity's tiers give its terms)")
    token.add_argument("--openid", help="WeChat openid claim (the payer of WeChat Pay)")
    token.set_defaults(run=cmd_token)

    data_keys = commands.add_parser("keys", help="data keys of personal data on orders")
    key_actions = data_keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    rotate = key_actions.add_parser(
        "rotate", help="re-encrypt stored orders under the first key (resumable, live-safe)"
    )
    rotate.add_argument("--after", default="", help="resume after this order id (the cursor)")
    rotate.add_argument("--batch", type=int, default=500, help="orders per pass (default 500)")
    new = key_actions.add_parser("new", help="print a fresh random kid:base64key")
    new.add_argument("kid")
    data_keys.set_defaults(run=cmd_keys)
    return root


class _Redacting(logging.Formatter):
    """Every log line (tracebacks included) with URL passwords replaced by ***."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._inner.format(record))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Redacting(handler.formatter))
    try:
        settings = settings_module.load()
        code: int = args.run(settings, args)
    except SettingsError as exc:
        print(f"seckill: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return code
