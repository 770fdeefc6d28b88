"""The `seckill` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from seckill import __version__
from seckill import settings as settings_module
from seckill.auth import UserAuth
from seckill.embedded import EmbeddedRedis, EmbeddedRedisError
from seckill.settings import Settings, SettingsError

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


def _warn_dev_secrets(settings: Settings) -> None:
    for name, value in (
        ("SECKILL_JWT_SECRET", settings.jwt.secret),
        ("SECKILL_ADMIN_TOKEN", settings.admin.token),
        ("SECKILL_PAYMENT_SECRET", settings.payment.secret),
    ):
        if value.startswith("dev-only-"):
            log.warning("%s is the built-in development value: set it before a real sale", name)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Everything on one machine: embedded Redis (unless SECKILL_REDIS_URL) + gateway."""
    from seckill import server

    settings = _with_listen(settings, args)
    _warn_dev_secrets(settings)
    embedded: EmbeddedRedis | None = None
    if not settings.redis.url:
        embedded = EmbeddedRedis(
            Path(settings.server.var_dir) / "redis", appendfsync=settings.redis.appendfsync
        )
        try:
            url = embedded.start()
        except EmbeddedRedisError as exc:
            print(f"seckill: {exc}", file=sys.stderr)
            return 1
        settings = settings.replace("redis", url=url)
    try:
        return server.serve(settings, 1, _announce)
    finally:
        if embedded is not None:
            embedded.stop()


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
    _warn_dev_secrets(settings)
    return server.serve(settings, workers, _announce)


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    """Print a user JWT signed with the configured secret."""
    ttl = args.ttl if args.ttl is not None else settings.jwt.default_ttl_s
    if ttl <= 0:
        print("seckill: --ttl must be a positive number of seconds", file=sys.stderr)
        return 2
    try:
        print(UserAuth(settings.jwt.secret).mint(args.user_id, ttl))
    except ValueError as exc:
        print(f"seckill: {exc}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="seckill", description="Flash-sale gateway.")
    root.add_argument("--version", action="version", version=f"seckill {__version__}")
    root.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="gateway + embedded Redis on one machine")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.set_defaults(run=cmd_up)

    serve = commands.add_parser("serve", help="the gateway only (stateless; run many)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(run=cmd_serve)

    token = commands.add_parser("token", help="print a user JWT for testing")
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, help="seconds (default: jwt.default_ttl_s)")
    token.set_defaults(run=cmd_token)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = settings_module.load()
        code: int = args.run(settings, args)
    except SettingsError as exc:
        print(f"seckill: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return code
