"""A fair sale's registration and queue over the scripts (lua/turns.lua has the design)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from seckill import keys
from seckill.scripts import Scripts


class Registration(enum.Enum):
    """What register.lua decided."""

    CREATED = "created"
    REGISTERED = "registered"  # already registered: the idempotent repeat
    CLOSED = "closed"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Registered:
    outcome: Registration
    seq: int = 0  # 1 for the first registrant
    device_accounts: int = 0  # accounts registered with this device id (0: none given)


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

    def __init__(self, client: Redis, scripts: Scripts) -> None:
        self._client = client
        self._scripts = scripts

    async def register(self, activity_id: str, user_id: str, device_id: str = "") -> Registered:
        """Register the user once (atomic: the registrant hash, order list and device count)."""
        reply = await self._scripts.register(
            self._client, keys.register_keys(activity_id), [user_id, device_id]
        )
        outcome = Registration(reply[0].decode())
        if outcome is Registration.CREATED:
            return Registered(outcome, int(reply[1]), int(reply[2]))
        if outcome is Registration.REGISTERED:
            return Registered(outcome, int(reply[1]))
        return Registered(outcome)

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
