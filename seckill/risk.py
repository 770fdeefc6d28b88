"""Risk rules against scalper bots: config/risk.toml (hot-reloaded), screening, hits.

Where each rule is decided, and why:

- the deny list (users, devices, IPs, with a TTL) is cached in every process (denylist.py):
  checking it costs a dict lookup;
- velocity (attempts per user / device / IP across activities over a sliding window) is one
  small script per subject on the subject's own hash tag (risk_velocity.lua), sent in one
  pipelined round trip before the purchase: its counters span activities, so they cannot
  live under an activity's tag;
- accounts per device and orders per address depend on what was bought, so they are decided
  inside reserve_stock.lua (lua/risk.lua), in the same atomic step as the purchase.

The gateway's hits (deny list, velocity) travel into the purchase script as an argument, so
the script answers them in the contract's place: after idempotency (a replay still replays)
and switches, before rate limits. Every rule has a mode: "enforce" refuses (403
risk_refused, whose message never names the rule), "shadow" counts and lists the hit and lets
the request go on, "off" skips it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import logging
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors

from seckill import clock, keys
from seckill.connections import Client
from seckill.denylist import KINDS, DenyList, normalise_ip
from seckill.events import reraise_pending_cancel
from seckill.rulefile import RuleFile
from seckill.scripts import CONNECTION_ERRORS, Coalescer, Scripts

log = logging.getLogger(__name__)

MODES = ("enforce", "shadow", "off")
# every rule name a hit may carry (bounded: the metric's label)
HIT_RULES = (
    "deny_user",
    "deny_device",
    "deny_ip",
    "user_velocity",
    "device_velocity",
    "ip_velocity",
    "device_accounts",
    "address_orders",
)


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: its mode and, depending on the rule, a maximum and a window."""

    mode: str = "off"
    most: int = 0  # max_accounts, max_orders or max_attempts
    window_s: int = 0

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def script_mode(self) -> str:
        return "shadow" if self.mode == "shadow" else "enforce"


@dataclass(frozen=True, slots=True)
class RiskRules:
    """Every rule of config/risk.toml (a rule without a table is off)."""

    deny: Rule = Rule()
    device_accounts: Rule = Rule()
    address_orders: Rule = Rule()
    user_velocity: Rule = Rule()
    device_velocity: Rule = Rule()
    ip_velocity: Rule = Rule()
    # [activity.<id>.device_accounts] / [activity.<id>.address_orders]: one sale's own rules
    activities: dict[str, RiskRules] = dataclasses.field(default_factory=dict)

    def velocity(self, kind: str) -> Rule:
        rule: Rule = getattr(self, f"{kind}_velocity")
        return rule

    def for_activity(self, activity_id: str) -> RiskRules:
        """The rules of one activity (its overrides, else these)."""
        return self.activities.get(activity_id, self)


# rules an activity may set for itself (velocity spans activities, the deny list is global)
PER_ACTIVITY = ("device_accounts", "address_orders")
# table -> (its count key, whether it has a window)
_TABLES: dict[str, tuple[str | None, bool]] = {
    "deny": (None, False),
    "device_accounts": ("max_accounts", False),
    "address_orders": ("max_orders", False),
    "user_velocity": ("max_attempts", True),
    "device_velocity": ("max_attempts", True),
    "ip_velocity": ("max_attempts", True),
}


def _positive_int(where: str, value: Any, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{where} must be an integer in 1..{most}")
    return value


def _rule(name: str, table: Any) -> Rule:
    if not isinstance(table, dict):
        raise ValueError(f"[{name}] must be a table")
    count_key, windowed = _TABLES[name]
    allowed = {"mode", *([count_key] if count_key else []), *(["window_s"] if windowed else [])}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown key {unknown[0]!r}")
    mode = table.get("mode")
    if mode not in MODES:
        raise ValueError(f'{name}.mode must be "enforce", "shadow" or "off"')
    most = 0
    if count_key is not None:
        if count_key not in table:
            raise ValueError(f"{name}: missing {count_key}")
        most = _positive_int(f"{name}.{count_key}", table[count_key], 1_000_000)
    window_s = 0
    if windowed:
        if "window_s" not in table:
            raise ValueError(f"{name}: missing window_s")
        window_s = _positive_int(f"{name}.window_s", table["window_s"], 86_400)
    return Rule(mode, most, window_s)


def parse(text: str) -> RiskRules:
    """The rules of a risk.toml text; ValueError naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from exc
    unknown = sorted(set(data) - set(_TABLES) - {"activity"})
    if unknown:
        raise ValueError(f"unknown table [{unknown[0]}]")
    overrides = data.pop("activity", {})
    tables: dict[str, Any] = {name: _rule(name, table) for name, table in data.items()}
    default = RiskRules(**tables)
    if not isinstance(overrides, dict):
        raise ValueError("[activity] must hold one table per activity")
    activities = {}
    for activity_id, rules in overrides.items():
        if not isinstance(rules, dict):
            raise ValueError(f"[activity.{activity_id}] must be a table")
        wrong = sorted(set(rules) - set(PER_ACTIVITY))
        if wrong:
            raise ValueError(
                f"activity.{activity_id}: {wrong[0]!r} cannot be set per activity"
                f" (only {', '.join(PER_ACTIVITY)})"
            )
        own: dict[str, Any] = {name: _rule(name, table) for name, table in rules.items()}
        activities[activity_id] = dataclasses.replace(default, **own)
    return dataclasses.replace(default, activities=activities)


class RulesFile(RuleFile):
    """config/risk.toml in force, re-read when it changes."""

    kind = "risk"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.rules = RiskRules()
        self.velocity: tuple[tuple[str, tuple[str, str, int, int]], ...] = ()
        self.maybe_reload()

    def apply(self, text: str) -> None:
        rules = parse(text)
        # (kind, its ARGV for the purchase script) of each velocity rule in force: worked out
        # once per reload, not per order
        self.velocity = tuple(
            (kind, (f"{kind}_velocity", rule.script_mode(), rule.window_s * 1000, rule.most))
            for kind in KINDS
            if (rule := rules.velocity(kind)).on
        )
        self.rules = rules


def hash_key(configured: str, jwt_secret: str) -> bytes:
    """The key of subject hashes: [risk] hash_key (base64), else derived from the JWT secret."""
    if configured:
        return base64.b64decode(configured, validate=True)
    return hmac.new(jwt_secret.encode(), b"seckill risk subject v1", hashlib.sha256).digest()


_KNOWN_MAX = 65_536  # subjects whose hashes are remembered (about 10 MB)


class Hashing:
    """Keyed hashes of subjects: Redis keys, hits and the deny list never hold them in clear."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        # (kind, raw value) -> hash: a buyer's retries, and every buyer behind one NAT address,
        # are hashed (and the address parsed) once
        self._known: dict[tuple[str, str], str] = {}

    def hash(self, kind: str, value: str) -> str:
        if not value:
            return ""
        digest = hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256)
        return digest.hexdigest()[:20]

    def of(self, kind: str, raw: str) -> str:
        """The hash of a subject as it came in (an address is normalised first); "" for ""."""
        known = self._known.get((kind, raw))
        if known is None:
            known = self.hash(kind, normalise_ip(raw) if kind == "ip" else raw)
            if len(self._known) >= _KNOWN_MAX:
                self._known.clear()
            self._known[kind, raw] = known
        return known

    def subject(self, user_id: str, device_id: str, remote: str | None) -> Subject:
        return Subject(self, user_id, device_id, remote)


class Subject:
    """Who attempts: user, device and IP, each read as a keyed hash ("" when not known).

    Hashed on first use only: the sold-out fast path with an empty deny list never pays for it.
    """

    __slots__ = ("_hashed", "_hashing", "_raw")

    def __init__(self, hashing: Hashing, user_id: str, device_id: str, remote: str | None):
        self._hashing = hashing
        self._raw = {"user": user_id, "device": device_id, "ip": remote or ""}
        self._hashed: dict[str, str] = {}

    def of(self, kind: str) -> str:
        """The keyed hash of ``kind`` ("user", "device" or "ip"), "" when not known."""
        hashed = self._hashed.get(kind)
        if hashed is None:
            hashed = self._hashed[kind] = self._hashing.of(kind, self._raw[kind])
        return hashed

    @property
    def user(self) -> str:
        return self.of("user")

    @property
    def device(self) -> str:
        return self.of("device")

    @property
    def ip(self) -> str:
        return self.of("ip")


@dataclass(frozen=True, slots=True)
class Hit:
    rule: str
    mode: str  # "enforced" or "shadow"
    activity_id: str
    subject: str  # "<kind>:<hash>"
    at_ms: int

    def public(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "mode": self.mode,
            "activity_id": self.activity_id,
            "subject": self.subject,
            "at": clock.to_rfc3339(self.at_ms),
        }


_LISTING_FAULTS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, redis_errors.RedisError)
# the hits stream is a window on recent activity, trimmed by age (MINID), never by count
HITS_KEPT_MS = 24 * 3600 * 1000
# hits listed per flush (400/s): the listing is a sample for ops to read; a storm of hits is
# counted exactly by the metric, and writing each one to Redis would cost the gateway more
_FLUSH_MOST = 100


class HitLog:
    """Counts every hit in this process (the metric) and lists a capped sample in Redis.

    Hits are buffered and written every ``interval_s`` in one pipeline, off the request path;
    in a storm of refusals the list keeps at most _FLUSH_MOST per interval and counts the rest
    as dropped, while the counts stay exact.
    """

    def __init__(self, client: Client, interval_s: float = 0.25) -> None:
        self._client = client
        self._interval_s = interval_s
        self.counts: dict[tuple[str, str], int] = {}
        self.dropped = 0
        self._buffer: list[Hit] = []
        self._closed = False

    def add(self, hit: Hit) -> None:
        key = (hit.rule, hit.mode)
        self.counts[key] = self.counts.get(key, 0) + 1
        if len(self._buffer) < _FLUSH_MOST:
            self._buffer.append(hit)
        else:
            self.dropped += 1

    async def flush(self) -> None:
        """Write the buffered hits to the capped stream (one round trip)."""
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        pipe = self._client.pipeline(transaction=False)
        for hit in batch:
            pipe.xadd(
                keys.RISK_HITS,
                {
                    "rule": hit.rule,
                    "mode": hit.mode,
                    "activity_id": hit.activity_id,
                    "subject": hit.subject,
                    "at_ms": hit.at_ms,
                },
                minid=f"{hit.at_ms - HITS_KEPT_MS}-0",
                approximate=True,
            )
        try:
            await pipe.execute()
        except _LISTING_FAULTS as exc:
            # the listing is a window on recent hits: losing a batch never stops the loop
            reraise_pending_cancel()
            self.dropped += len(batch)
            log.warning("%d risk hits not listed (%s); still counted", len(batch), exc)

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The most recent hits, newest first."""
        entries: Any = await self._client.xrevrange(keys.RISK_HITS, count=limit)
        out = []
        for _, fields in entries:
            item = {k.decode(): v.decode() for k, v in fields.items()}
            hit = Hit(item["rule"], item["mode"], item["activity_id"], item["subject"], 0)
            out.append({**hit.public(), "at": clock.to_rfc3339(int(item["at_ms"]))})
        return out

    def close(self) -> None:
        self._closed = True

    async def run(self) -> None:
        """Flush every interval until closed, then once more."""
        while not self._closed:
            await asyncio.sleep(self._interval_s)
            await self.flush()
        await self.flush()


@dataclass(frozen=True, slots=True)
class Screening:
    """What the gateway decided before the purchase script: the subject and its hits."""

    subject: Subject
    hits: tuple[tuple[str, str], ...] = ()  # (rule, "enforce" | "shadow")

    @property
    def refused(self) -> bool:
        return any(mode == "enforce" for _, mode in self.hits)

    def with_hits(self, more: Iterable[tuple[str, str]]) -> Screening:
        return dataclasses.replace(self, hits=(*self.hits, *more))

    def argument(self) -> str:
        return ",".join(f"{rule}:{mode}" for rule, mode in self.hits)


class Risk:
    """The risk rules as the purchase path (and registration) applies them."""

    def __init__(
        self,
        scripts: Scripts,
        coalescer: Coalescer,
        rules: RulesFile,
        hashing: Hashing,
        deny: DenyList,
        hits: HitLog,
        *,
        one_call: bool = True,
    ) -> None:
        self._scripts = scripts
        self._coalescer = coalescer
        self.file = rules
        self.hashing = hashing
        self.deny = deny
        self.hits = hits
        # one Redis: every subject's counter in one call. On Redis Cluster each counter sits
        # in its own slot (its own hash tag): one call per subject, all in one pipeline.
        self.one_call = one_call

    @property
    def rules(self) -> RiskRules:
        return self.file.rules

    def subject(self, user_id: str, device_id: str, remote: str | None) -> Subject:
        return self.hashing.subject(user_id, device_id, remote)

    @property
    def denies_nobody(self) -> bool:
        """Whether screen_locally can only find no hits (the rule off, or nobody listed)."""
        return not self.rules.deny.on or self.deny.empty

    def screen_locally(self, subject: Subject) -> Screening:
        """The deny list (local, no Redis): a Screening with its hits."""
        rule = self.rules.deny
        if not rule.on or self.deny.empty:
            return Screening(subject)
        now = clock.now_ms()
        hits = tuple(
            (f"deny_{kind}", rule.script_mode())
            for kind in KINDS
            if subject.of(kind) and self.deny.denied(kind, subject.of(kind), now)
        )
        return Screening(subject, hits)

    async def screen_velocity(self, screening: Screening) -> Screening:
        """Count this attempt for each subject under a velocity rule (one round trip)."""
        rules = self.rules
        kinds = [kind for kind in KINDS if rules.velocity(kind).on and screening.subject.of(kind)]
        if not kinds:
            return screening
        groups = [kinds] if self.one_call else [[kind] for kind in kinds]
        try:
            replies = await self._velocity(groups, rules, screening.subject)
        except redis_errors.ResponseError as exc:
            if not (isinstance(exc, redis_errors.OutOfMemoryError) or str(exc).startswith("OOM")):
                raise
            # Redis at maxmemory refuses the count; it refuses the purchase too, and the
            # purchase script still answers a replay: go on uncounted rather than hide it
            return screening
        over = [
            kind
            for group, reply in zip(groups, replies, strict=True)
            for i, kind in enumerate(group)
            if int(reply[2 * i]) == 1
        ]
        return screening.with_hits(
            (f"{kind}_velocity", rules.velocity(kind).script_mode()) for kind in over
        )

    async def _velocity(
        self, groups: list[list[str]], rules: RiskRules, subject: Subject
    ) -> list[Any]:
        return await asyncio.gather(
            *(
                self._coalescer.call(
                    self._scripts.risk_velocity,
                    [keys.velocity(kind, subject.of(kind)) for kind in group],
                    [
                        n
                        for kind in group
                        for n in (rules.velocity(kind).window_s * 1000, rules.velocity(kind).most)
                    ],
                )
                for group in groups
            )
        )

    async def screen(self, user_id: str, device_id: str, remote: str | None) -> Screening:
        """Deny list and velocity for one attempt: the hook for any endpoint that risk rules
        guard besides the purchase (registration).

        Such an endpoint calls ``screen``, refuses at once when ``screening.refused`` (403
        risk_refused, after recording ``screening.hits``), else passes ``script_keys`` and
        ``script_args`` to its own script, which inlines lua/risk.lua: ``risk_assess`` (the
        accounts-per-device count, and the gateway's hits) before its first write, and
        ``risk_record`` with its writes; then ``record`` the hits the script returns.
        """
        screening = self.screen_locally(self.subject(user_id, device_id, remote))
        if screening.refused:
            return screening  # refused already: the attempt is not worth a round trip
        return await self.screen_velocity(screening)

    def script_parts(
        self, space: str, activity_id: str, screening: Screening, velocity: bool = False
    ) -> tuple[list[str], list[str | int]]:
        """The KEYS and ARGV appended to reserve_stock.lua's at RISK_KEYS and RISK_ARGV.

        ``space``: the activity's key space (its bucket's, when bucketed). With ``velocity``,
        the counters the script counts this attempt on and their rules follow: on one Redis
        that saves the purchase a round trip, where the gateway's own count
        (screen_velocity) would cost one.
        """
        subject = screening.subject
        device = subject.device
        found = keys.risk_reserve_keys(space, device)
        rules = self.rules.for_activity(activity_id)
        devices, addresses = rules.device_accounts, rules.address_orders
        args: list[str | int] = [
            screening.argument(),
            device,
            devices.most if devices.on else 0,
            devices.script_mode(),
            addresses.most if addresses.on else 0,
            addresses.script_mode(),
        ]
        if velocity:
            counted = [
                (kind, arguments, subject.of(kind)) for kind, arguments in self.file.velocity
            ]
            counted = [entry for entry in counted if entry[2]]
            args.append(len(counted))
            for kind, arguments, hashed in counted:
                found.append(keys.velocity(kind, hashed))
                args += arguments
        return found, args

    def record(
        self,
        activity_id: str,
        subject: Subject,
        hits: Iterable[tuple[str, str]],
        address_hash: str = "",
    ) -> None:
        """Count and list hits ("<rule>", "enforce" | "shadow") of one attempt."""
        now = clock.now_ms()
        for rule, mode in hits:
            if rule not in HIT_RULES:
                continue
            self.hits.add(
                Hit(
                    rule,
                    "shadow" if mode == "shadow" else "enforced",
                    activity_id,
                    _shown(rule, subject, address_hash),
                    now,
                )
            )


def _shown(rule: str, subject: Subject, address_hash: str) -> str:
    """The hashed subject a hit is about, as the hits listing shows it."""
    if rule == "address_orders":
        return f"address:{address_hash.rpartition(':')[2][:20]}"
    kind = "device" if rule == "device_accounts" else rule.removeprefix("deny_").split("_")[0]
    return f"{kind}:{subject.of(kind)}"
