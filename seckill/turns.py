"""A fair sale's registration and queue over the scripts (lua/turns.lua has the design)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from seckill import keys
from seckill.connections import Client
from seckill.scripts import Scripts
from seckill.stock import risk_hits


class Registration(enum.Enum):
    """What register.lua decided."""

    CREATED = "created"
    REGISTERED = "registered"  # already registered: the idempotent repeat
    CLOSED = "closed"
    RISK_REFUSED = "risk_refused"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Registered:
    outcome: Registration
    seq: int = 0  # 1 for the first registrant
    device_accounts: int = 0  # accounts registered with this device id (0: none given)
    # risk rules that hit ((rule, "enforce" | "shadow"), shadow ones included)
    risk_hits: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Standing:
    """Where one user stands (queue_position.lua), times from Redis's clock."""

    status: str  # fcfs, upcoming, ended, undrawn, unplaced, waiting, admitted, passed, used
    registered: bool
    position: int | None
    ahead: int | None
    eta_ms: int | None
    claim_ends_ms: int | None
    now_ms: int


class Turns:
    """Registration and queue reads of fair sales; knows nothing of HTTP."""

    def __init__(self, client: Client, scripts: Scripts) -> None:
        self._client = client
        self._scripts = scripts

    async def register(
        self,
        activity_id: str,
        user_id: str,
        device: str = "",
        risk: tuple[Sequence[str], Sequence[str | int]] | None = None,
    ) -> Registered:
        """Register the user once (atomic: the registrant hash, order list and device count).

        ``device``: the device id as the gateway keeps it (a keyed hash); ``risk``: the risk
        rules' (KEYS, ARGV), appended at register.lua's RISK_KEYS and RISK_ARGV.
        """
        script_keys = keys.register_keys(activity_id)
        args: list[str | int] = [user_id, device]
        if risk is not None:
            script_keys += risk[0]
            args += risk[1]
        reply: Any = await self._scripts.register(self._client, script_keys, args)
        hits: tuple[tuple[str, str], ...] = ()
        if isinstance(reply[-1], list) and reply[-1][:1] == [b"risk"]:
            hits = risk_hits(reply[-1])
            reply = reply[:-1]
        outcome = Registration(reply[0].decode())
        if outcome is Registration.CREATED:
            return Registered(outcome, int(reply[1]), int(reply[2]), hits)
        if outcome is Registration.REGISTERED:
            return Registered(outcome, int(reply[1]))
        return Registered(outcome, risk_hits=hits)

    async def standing(self, activity_id: str, user_id: str) -> Standing | None:
        """The user's place in the sale, or None for an unknown activity."""
        reply: Any = await self._scripts.queue_position(
            self._client, keys.queue_keys(activity_id), [user_id]
        )
        status = reply[0].decode()
        if status == "not_found":
            return None

        def known(value: Any) -> int | None:
            number = int(value)
            return None if number < 0 else number

        return Standing(
            status=status,
            registered=int(reply[1]) == 1,
            position=known(reply[2]),
            ahead=known(reply[3]),
            eta_ms=known(reply[4]),
            claim_ends_ms=int(reply[5]) or None,
            now_ms=int(reply[6]),
        )
