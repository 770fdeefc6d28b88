"""Degradation switches: flags in Redis that ops flip at runtime, seen by every process in 1 s.

Each process keeps the flags in a dict (no Redis call on the request path). A change is
announced on ``sk:events`` and every process also re-reads all flags every
``resync_interval_s``, so a restarted process or a lost message converges. A flag set with a
TTL returns to its previous value when the TTL runs out: every process checks for due reverts,
and set_flag.lua applies each revert once. Every change, the reverts included, is audited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from seckill import clock, keys
from seckill.connections import Client
from seckill.errors import InvalidRequest
from seckill.events import Events, reraise_pending_cancel
from seckill.scripts import CONNECTION_ERRORS, Arg, Coalescer, Scripts

log = logging.getLogger(__name__)

FLAGS = f"{keys.PREFIX}:{{flags}}:values"
FLAG_META = f"{keys.PREFIX}:{{flags}}:meta"
FLAG_AUDIT = f"{keys.PREFIX}:{{flags}}:audit"


@dataclass(frozen=True, slots=True)
class Flag:
    """What a flag is for, its type and its value when never set."""

    kind: type
    default: Any
    help: str


KNOWN: dict[str, Flag] = {
    "seckill.enabled": Flag(bool, True, "false: every order POST answers 503 degraded"),
    "reviews.enabled": Flag(bool, True, "false: reviews answer a fallback, degraded: true"),
    "recommendations.enabled": Flag(
        bool, True, "false: recommendations answer a fallback, degraded: true"
    ),
    "admission.factor": Flag(
        float, 1.0, "multiplies every admission rate limit (0.5 halves the intake)"
    ),
}
PER_ACTIVITY: dict[str, Flag] = {
    "paused": Flag(bool, False, "true: this activity's order POST answers 503 paused"),
    "closed": Flag(bool, False, "true: the sale ends now (409 ended), stock stays"),
}
_ACTIVITY_FLAG = re.compile(r"activity\.([A-Za-z0-9_-]{1,64})\.(paused|closed)")


def describe(name: str) -> Flag | None:
    """The flag a name denotes, or None for a name seckill does not know."""
    flag = KNOWN.get(name)
    if flag is not None:
        return flag
    match = _ACTIVITY_FLAG.fullmatch(name)
    return PER_ACTIVITY[match.group(2)] if match else None


def validate(name: str, value: Any) -> Any:
    """The value normalized for the flag; InvalidRequest for unknown names or wrong types."""
    flag = describe(name)
    if flag is None:
        raise InvalidRequest(
            f"unknown flag {name!r}: known are {', '.join(sorted(KNOWN))},"
            " activity.<id>.paused, activity.<id>.closed"
        )
    if flag.kind is bool:
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name} takes true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} takes a number")
    if name == "admission.factor" and not 0 < value <= 100:
        raise InvalidRequest("admission.factor must be in (0, 100]")
    return float(value)


class Switches:
    def __init__(
        self,
        client: Client,
        scripts: Scripts,
        *,
        resync_interval_s: float = 0.5,
        coalescer: Coalescer | None = None,
    ):
        self._client = client
        self._scripts = scripts
        # the gateway's: an admin's change then waits for a replica as a purchase does
        # (durability = "replicated"); the CLI runs the script directly
        self._coalescer = coalescer
        self._resync_interval_s = resync_interval_s
        self._values: dict[str, Any] = {}
        self._expiries: dict[str, int] = {}
        self._changes = 0  # flag changes made by this process, to tell a stale reading
        self._closed = False

    # -- the request path: local reads only ------------------------------------------------

    def value(self, name: str) -> Any:
        """The flag's current value as this process last saw it."""
        found = self._values.get(name)
        if found is not None:
            return found
        flag = describe(name)
        return flag.default if flag else None

    def gate(self, activity_id: str) -> str:
        """The switch that refuses an order POST for this activity now, or ""."""
        if not self._values:
            return ""  # nothing set anywhere: the common case costs one dict lookup
        if self.value("seckill.enabled") is False:
            return "degraded"
        if self._values.get(f"activity.{activity_id}.paused") is True:
            return "paused"
        if self._values.get(f"activity.{activity_id}.closed") is True:
            return "ended"
        return ""

    def all(self) -> dict[str, Any]:
        """Every known flag and every flag set, with its current value."""
        return {**{name: flag.default for name, flag in KNOWN.items()}, **self._values}

    def expiries(self) -> dict[str, str]:
        """When each flag set with a TTL returns to its previous value (RFC 3339)."""
        return {name: clock.to_rfc3339(at) for name, at in sorted(self._expiries.items())}

    # -- changes ----------------------------------------------------------------------------

    async def set(self, name: str, value: Any, ttl_s: int | None, who: str) -> dict[str, Any]:
        """Change a flag (validated), audited and announced; the contract's PUT answer."""
        value = validate(name, value)
        if ttl_s is not None and (
            isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= 30 * 86_400
        ):
            raise InvalidRequest("ttl_s must be an integer of seconds in 1..2592000")
        flag = describe(name)
        assert flag is not None
        flag_keys = [FLAGS, FLAG_META, FLAG_AUDIT]
        args: list[Arg] = [
            name,
            json.dumps(value),
            "" if ttl_s is None else ttl_s,
            who,
            json.dumps(flag.default),
            keys.EVENTS_CHANNEL,
            "set",
        ]
        if self._coalescer is not None:
            reply = await self._coalescer.call(self._scripts.set_flag, flag_keys, args)
        else:
            reply = await self._scripts.set_flag(self._client, flag_keys, args)
        expires = reply[1].decode()
        # known here at once, not only after the event comes back (a snapshot may come first)
        self._values[name] = value
        if expires:
            self._expiries[name] = int(expires)
        else:
            self._expiries.pop(name, None)
        self._changes += 1
        return {
            "name": name,
            "value": value,
            "previous": json.loads(reply[0]),
            "expires_at": clock.to_rfc3339(int(expires)) if expires else None,
        }

    async def load(self) -> None:
        """Re-read every flag from Redis."""
        while True:
            changes = self._changes
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(FLAGS)
            pipe.hgetall(FLAG_META)
            raw_values, raw_meta = await pipe.execute()
            # a change of this process's own landed while we read: what we read may predate
            # it, and would undo it here until the next resync
            if changes == self._changes:
                break
        self._values = {k.decode(): json.loads(v) for k, v in raw_values.items()}
        expiries = {}
        for name, meta in raw_meta.items():
            at = json.loads(meta).get("expires_at_ms")
            if at is not None:
                expiries[name.decode()] = int(at)
        self._expiries = expiries

    async def revert_due(self) -> int:
        """Return flags whose TTL ran out to their previous value (once, whoever runs it)."""
        reverted = 0
        now = clock.now_ms()
        for name, at in list(self._expiries.items()):
            if at > now:
                continue
            flag = describe(name)
            default = json.dumps(flag.default if flag else None)
            reply = await self._scripts.set_flag(
                self._client,
                [FLAGS, FLAG_META, FLAG_AUDIT],
                [name, "null", "", "ttl-expiry", default, keys.EVENTS_CHANNEL, "revert"],
            )
            if reply[0] != b"not_due":
                reverted += 1
                log.info("flag %s returned to its previous value (TTL over)", name)
        if reverted:
            await self.load()
        return reverted

    async def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent changes, newest first."""
        entries: Any = await self._client.xrevrange(FLAG_AUDIT, count=limit)
        out = []
        for _, fields in entries:
            item = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(
                {
                    "at": clock.to_rfc3339(int(item["at_ms"])),
                    "who": item["who"],
                    "name": item["name"],
                    "old": json.loads(item["old"]),
                    "new": json.loads(item["new"]),
                    "ttl_s": int(item["ttl_s"]) if item["ttl_s"] else None,
                }
            )
        return out

    # -- background -------------------------------------------------------------------------

    def listen(self, events: Events) -> None:
        events.on("flags", lambda _name: self._spawn_load(), self.load)

    def _spawn_load(self) -> None:
        task = asyncio.ensure_future(self._load_quietly())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _load_quietly(self) -> None:
        try:
            await self.load()
        except CONNECTION_ERRORS:
            reraise_pending_cancel()
            log.warning("could not re-read the flags; keeping the last values")

    def close(self) -> None:
        self._closed = True

    async def run(self) -> None:
        """Resync and apply due reverts every resync_interval_s, until closed."""
        while not self._closed:
            try:
                await self.load()
                await self.revert_due()
            except CONNECTION_ERRORS:
                reraise_pending_cancel()
                log.warning("flags unreachable; keeping the last values")
            await asyncio.sleep(self._resync_interval_s)
