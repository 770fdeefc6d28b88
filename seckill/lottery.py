"""A lottery's draw: the committed seed, the order it gives, its installation and its proof.

The algorithm, so that anyone can redo it (``seckill draw verify``, or ten lines elsewhere):

- At creation the activity gets a seed: 32 random bytes, written as 64 lowercase hex
  characters. Its commitment is ``sha256(seed as those 64 ASCII characters)``, hex, published
  by ``GET /admin/v1/activities/{id}/draw`` from then on; the seed itself only once the sale
  has ended.
- At ``starts_at`` the registrants (final then: registration closes at ``starts_at`` by Redis's
  clock) are ordered by ``HMAC-SHA256(key = seed's 64 ASCII characters, message = user id in
  UTF-8)``, ascending as bytes, ties (never seen in practice) by user id. The order therefore
  depends on who registered, never on when or in which order they did, and nobody (the
  operator included) can choose it once the commitment is out.
- Position 1 is the first of that order. The published digest of the order is
  ``sha256("\\n".join(user ids in order))``, hex.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from seckill import keys
from seckill.connections import Client
from seckill.errors import RedisUnavailable
from seckill.scripts import CONNECTION_ERRORS, Scripts

log = logging.getLogger(__name__)

_PAGE = 10_000  # registrants read, and positions written, per round trip
_LOCK_MS = 60_000  # one drawer at a time; another may take over after this


def new_seed() -> str:
    """A fresh seed: 32 random bytes as 64 lowercase hex characters."""
    return secrets.token_hex(32)


def commitment(seed: str) -> str:
    """The published commitment of ``seed``: hex SHA-256 of its ASCII characters."""
    return hashlib.sha256(seed.encode("ascii")).hexdigest()


def order(seed: str, registrants: Iterable[str]) -> list[str]:
    """The lottery order of ``registrants`` under ``seed`` (independent of their input order)."""
    key = seed.encode("ascii")
    return sorted(
        set(registrants),
        key=lambda user: (hmac.new(key, user.encode(), hashlib.sha256).digest(), user),
    )


def digest(ordered: Sequence[str]) -> str:
    """Hex SHA-256 of the user ids in order, one per line (no trailing newline)."""
    return hashlib.sha256("\n".join(ordered).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Draw:
    """What Redis holds of one lottery's draw."""

    commitment: str
    seed: str
    drawn_at_ms: int | None = None
    count: int | None = None
    digest: str | None = None


def problems(
    draw: Draw, registrants: Sequence[str], placed: dict[str, int] | None = None
) -> list[str]:
    """Why the draw does not verify (empty: it does), from the revealed seed and registrants.

    ``placed``: the positions actually in force (user -> position), checked when given.
    """
    found: list[str] = []
    if commitment(draw.seed) != draw.commitment:
        found.append("the seed does not match the published commitment")
    if draw.drawn_at_ms is None:
        found.append("no draw has been made yet")
        return found
    ordered = order(draw.seed, registrants)
    if len(ordered) != len(registrants):
        found.append("the registrant list names a user more than once")
    if draw.count is not None and draw.count != len(ordered):
        found.append(f"the draw placed {draw.count} users, the registrant list has {len(ordered)}")
    if draw.digest is not None and digest(ordered) != draw.digest:
        found.append("the order recomputed from the seed is not the published order")
    if placed is not None:
        expected = {user: i for i, user in enumerate(ordered, start=1)}
        if placed != expected:
            users = set(placed) | set(expected)
            wrong = sorted(u for u in users if placed.get(u) != expected.get(u))
            found.append(f"{len(wrong)} positions in force differ from the order, e.g. {wrong[0]}")
    return found


class Lottery:
    """Draws, reads and exports over Redis; knows nothing of HTTP."""

    def __init__(self, client: Client, scripts: Scripts) -> None:
        self._client = client
        self._scripts = scripts
        self._drawing: dict[str, asyncio.Task[str]] = {}

    def kick(self, activity_id: str) -> None:
        """Start drawing in the background unless this process already is (single flight)."""
        if activity_id in self._drawing:
            return
        task = asyncio.get_running_loop().create_task(self._draw_quietly(activity_id))
        self._drawing[activity_id] = task
        task.add_done_callback(lambda _: self._drawing.pop(activity_id, None))

    async def _draw_quietly(self, activity_id: str) -> str:
        try:
            return await self.draw(activity_id)
        except (RedisUnavailable, *CONNECTION_ERRORS) as exc:  # type: ignore[misc]
            # the next purchase or queue call after the start kicks it again
            log.warning("draw of %s not made now: %r", activity_id, exc)
            return "failed"

    async def draw(self, activity_id: str) -> str:
        """Compute and install the draw once; "installed", "drawn", "busy" or the refusal."""
        lock = keys.draw_lock(activity_id)
        nonce = secrets.token_hex(8)
        try:
            if not await self._client.set(lock, nonce, nx=True, px=_LOCK_MS):
                return "busy"  # another gateway is drawing: its install will count
            try:
                return await self._compute_and_install(activity_id, nonce)
            finally:
                await self._client.eval(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
                    1,
                    lock,
                    nonce,
                )
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    async def _compute_and_install(self, activity_id: str, nonce: str) -> str:
        if await self._client.hexists(keys.turns(activity_id), "n"):
            return "drawn"
        seed: Any = await self._client.hget(keys.draw(activity_id), "seed")
        if seed is None:
            return "no_seed"
        users = await self.registrants(activity_id)
        ordered = order(seed.decode(), users)
        staging = keys.draw_staging(activity_id, nonce)
        for start in range(0, len(ordered), _PAGE):
            page = ordered[start : start + _PAGE]
            mapping = {user: start + i for i, user in enumerate(page, start=1)}
            await self._client.hset(staging, mapping=mapping)  # type: ignore[arg-type]
            # a drawer that dies half way leaves nothing behind for long (the install persists)
            await self._client.pexpire(staging, _LOCK_MS * 10)
        reply = await self._scripts.install_draw(
            self._client,
            keys.install_draw_keys(activity_id, nonce),
            [len(ordered), digest(ordered)],
        )
        outcome: str = reply[0].decode()
        if outcome == "installed":
            log.info("drew %s: %d registrants", activity_id, len(ordered))
        return outcome

    async def registrants(self, activity_id: str) -> list[str]:
        """Every registered user id, in registration order (read a page per round trip)."""
        users: list[str] = []
        key = keys.registration_order(activity_id)
        try:
            while True:
                page: Any = await self._client.lrange(key, len(users), len(users) + _PAGE - 1)
                users += [u.decode() for u in page]
                if len(page) < _PAGE:
                    return users
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    async def registrant_page(self, activity_id: str, start: int, limit: int) -> list[str]:
        """``limit`` registered user ids from index ``start`` of the registration order."""
        try:
            page: Any = await self._client.lrange(
                keys.registration_order(activity_id), start, start + limit - 1
            )
            return [u.decode() for u in page]
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    async def registrant_count(self, activity_id: str) -> int:
        """How many users registered."""
        try:
            return int(await self._client.llen(keys.registration_order(activity_id)))
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc

    async def read(self, activity_id: str) -> Draw | None:
        """The stored draw, or None when the activity has no seed."""
        try:
            fields: Any = await self._client.hgetall(keys.draw(activity_id))
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        if b"seed" not in fields:
            return None

        def number(name: bytes) -> int | None:
            return int(fields[name]) if name in fields else None

        return Draw(
            commitment=fields[b"commitment"].decode(),
            seed=fields[b"seed"].decode(),
            drawn_at_ms=number(b"drawn_at_ms"),
            count=number(b"count"),
            digest=fields[b"digest"].decode() if b"digest" in fields else None,
        )

    async def placed(self, activity_id: str) -> dict[str, int]:
        """The positions in force (user -> position), read by cursor."""
        placed: dict[str, int] = {}
        try:
            async for user, position in self._client.hscan_iter(
                keys.positions(activity_id), count=_PAGE
            ):
                placed[user.decode()] = int(position)
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable() from exc
        return placed
