"""The deny list: users, devices and IPs refused for a while, cached in every process.

Subjects are stored as keyed hashes (``<kind>:<hash>``), never in clear. An admin change runs
risk_deny.lua (write, audit, version bump and announcement in one step); every process
re-reads the list when the announcement arrives and, in case it was lost, whenever the version
moved (checked every ``resync_interval_s``). Checking a subject is a dict lookup that compares
the entry's expiry with the clock: a TTL ends on time in every process, whoever purges it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_errors

from seckill import clock, keys
from seckill.connections import Client
from seckill.errors import InvalidRequest
from seckill.events import Events, reraise_pending_cancel
from seckill.scripts import CONNECTION_ERRORS, Scripts

log = logging.getLogger(__name__)

KINDS = ("user", "device", "ip")
MAX_TTL_S = 366 * 86_400
MAX_REASON = 200
_DENY_KEYS = [keys.RISK_DENY, keys.RISK_DENY_EXPIRIES, keys.RISK_AUDIT, keys.RISK_DENY_VERSION]

_RESYNC_FAULTS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    redis_errors.RedisError,
    ValueError,
    KeyError,
)
Hasher = Callable[[str, str], str]


def deny_body(body: Any) -> tuple[int | None, str]:
    """(ttl_s or None, reason) of a PUT body; InvalidRequest naming what is wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = sorted(set(body) - {"ttl_s", "reason"})
    if unknown:
        raise InvalidRequest(f"unknown field: {unknown[0]}")
    ttl = body.get("ttl_s")
    if "ttl_s" in body and (
        isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL_S
    ):
        raise InvalidRequest(
            f"ttl_s must be an integer of seconds in 1..{MAX_TTL_S} (absent: until deleted)"
        )
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise InvalidRequest(f"reason must be a string of at most {MAX_REASON} characters")
    return ttl, reason


def normalise_ip(remote: str | None) -> str:
    """One spelling per address (IPv6 compressed, IPv4-mapped as IPv4); "" when unknown."""
    if not remote:
        return ""
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.compressed


class DenyList:
    def __init__(
        self, client: Client, scripts: Scripts, hasher: Hasher, *, resync_interval_s: float = 0.5
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._hash = hasher
        self._resync_interval_s = resync_interval_s
        # "<kind>:<hash>" -> expires_at_ms (None: until deleted)
        self._entries: dict[str, int | None] = {}
        self._version: bytes | None = b"?"  # never a real version: the first resync loads
        # Reads and admin changes of this process take turns: a resync that read the list
        # before a DELETE must not land after it and bring the subject back.
        self._turn = asyncio.Lock()
        self._load_queued = False  # an announced resync still waits for its turn
        self._closed = False

    # -- the request path: local reads only ------------------------------------------------

    @property
    def empty(self) -> bool:
        return not self._entries

    def denied(self, kind: str, hashed: str, now_ms: int) -> bool:
        """True while ``hashed`` (a keyed hash of kind) is on the list and not expired."""
        if not self._entries:
            return False
        member = f"{kind}:{hashed}"
        if member not in self._entries:
            return False
        expires = self._entries[member]
        return expires is None or expires > now_ms

    # -- admin ------------------------------------------------------------------------------

    def member(self, kind: str, value: str) -> str:
        """The stored member for a raw subject; InvalidRequest for a bad kind or value."""
        if kind not in KINDS:
            raise InvalidRequest("kind must be user, device or ip")
        if kind == "device" and not keys.IDEMPOTENCY_KEY_PATTERN.fullmatch(value):
            raise InvalidRequest("a device id is 1-64 characters of [A-Za-z0-9_-]")
        if kind == "user" and not 1 <= len(value) <= 64:
            raise InvalidRequest("a user id is 1-64 characters")
        if kind == "ip":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise InvalidRequest("not an IP address") from None
            value = normalise_ip(value)
        return f"{kind}:{self._hash(kind, value)}"

    async def put(
        self, kind: str, value: str, ttl_s: int | None, reason: str, who: str
    ) -> dict[str, Any]:
        """List a subject (replacing its entry); audited, in effect everywhere within 1 s."""
        member = self.member(kind, value)
        async with self._turn:
            reply = await self._scripts.risk_deny(
                self._client,
                _DENY_KEYS,
                [member, "put", "" if ttl_s is None else ttl_s, reason, who, keys.EVENTS_CHANNEL],
            )
            expires = reply[0].decode()
            self._entries[member] = int(expires) if expires else None
        return {
            "kind": kind,
            "subject": member,
            "expires_at": clock.to_rfc3339(int(expires)) if expires else None,
            "reason": reason,
        }

    async def delete(self, kind: str, value: str, who: str) -> dict[str, Any]:
        """Take a subject off the list; audited. ``deleted`` says whether it was listed."""
        member = self.member(kind, value)
        async with self._turn:
            reply = await self._scripts.risk_deny(
                self._client, _DENY_KEYS, [member, "delete", "", "", who, keys.EVENTS_CHANNEL]
            )
            self._entries.pop(member, None)
        return {"kind": kind, "subject": member, "deleted": bool(reply[0])}

    async def listing(self, limit: int) -> list[dict[str, Any]]:
        """Entries in force, soonest expiry last (at most ``limit``)."""
        raw: Any = await self._client.hgetall(keys.RISK_DENY)
        now = clock.now_ms()
        out = []
        for member, blob in raw.items():
            entry = json.loads(blob)
            expires = entry.get("expires_at_ms")
            if expires is not None and expires <= now:
                continue
            kind, _, _ = member.decode().partition(":")
            out.append(
                {
                    "kind": kind,
                    "subject": member.decode(),
                    "expires_at": clock.to_rfc3339(expires) if expires is not None else None,
                    "reason": entry.get("reason", ""),
                    "listed_at": clock.to_rfc3339(int(entry["at_ms"])),
                }
            )
        out.sort(key=lambda e: e["listed_at"], reverse=True)
        return out[:limit]

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        """The most recent deny-list changes, newest first."""
        entries: Any = await self._client.xrevrange(keys.RISK_AUDIT, count=limit)
        out = []
        for _, fields in entries:
            item = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(
                {
                    "at": clock.to_rfc3339(int(item["at_ms"])),
                    "who": item["who"],
                    "action": item["action"],
                    "subject": item["member"],
                    "ttl_s": int(item["ttl_s"]) if item["ttl_s"] else None,
                    "reason": item["reason"],
                }
            )
        return out

    # -- background -------------------------------------------------------------------------

    async def load(self) -> None:
        """Re-read the list if its version moved since the last reading."""
        async with self._turn:
            await self._load()

    async def _load(self) -> None:
        version: Any = await self._client.get(keys.RISK_DENY_VERSION)
        if version == self._version:
            return
        raw: Any = await self._client.hgetall(keys.RISK_DENY)
        entries: dict[str, int | None] = {}
        for member, blob in raw.items():
            expires = json.loads(blob).get("expires_at_ms")
            entries[member.decode()] = None if expires is None else int(expires)
        self._entries = entries
        self._version = version

    def listen(self, events: Events) -> None:
        events.on("risk", lambda _subject: self._spawn_load(), self.load)

    def _spawn_load(self) -> None:
        if self._load_queued:
            return  # one resync that has not read yet covers every announcement so far
        self._load_queued = True
        task = asyncio.ensure_future(self._load_quietly(announced=True))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _load_quietly(self, announced: bool = False) -> None:
        try:
            async with self._turn:
                if announced:
                    # what is announced from here on needs a reading after this one
                    self._load_queued = announced = False
                await self._load()
        except _RESYNC_FAULTS as exc:
            # a resync that fails keeps the last list; the loop goes on
            reraise_pending_cancel()
            log.warning("could not re-read the deny list (%s); keeping the last one", exc)
        finally:
            if announced:  # cancelled before its turn
                self._load_queued = False

    def close(self) -> None:
        self._closed = True

    async def run(self) -> None:
        """Resync every resync_interval_s until closed."""
        while not self._closed:
            await self._load_quietly()
            await asyncio.sleep(self._resync_interval_s)
