"""Circuit breakers: pybreaker, driven from asyncio through one adapter.

pybreaker's own async support is Tornado's. Decorating an ``async def`` with it records a
success when the coroutine is *created*, before anything ran. Here admission is asked of the
breaker first, the coroutine is awaited outside its lock, and only then is the outcome
reported through ``breaker.call`` with a function that returns or raises what the await
gave. Only the exceptions named as failures count (connection errors and timeouts); business
outcomes are return values and never trip anything. In half-open exactly one probe is let
through; the others are refused as if the breaker were open.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pybreaker

log = logging.getLogger(__name__)

T = TypeVar("T")

STATES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}


class BreakerOpen(Exception):
    """The breaker refuses calls for now."""


class _Transitions(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: AsyncBreaker) -> None:
        self.owner = owner

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.owner.transitions += 1
        log.warning(
            "breaker %s: %s -> %s", cb.name, old_state.name if old_state else None, new_state.name
        )


class AsyncBreaker:
    def __init__(
        self,
        name: str,
        *,
        fail_max: int,
        reset_timeout_s: float,
        failures: tuple[type[BaseException], ...],
    ) -> None:
        self.name = name
        self.failures = failures
        self.transitions = 0
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout_s, name=name
        )
        self._breaker.add_listener(_Transitions(self))
        self._probing = False

    @property
    def state(self) -> str:
        """closed, open or half-open."""
        return str(self._breaker.current_state)

    def _admit(self) -> bool:
        """Raise BreakerOpen, or return whether this call is the half-open probe."""
        breaker = self._breaker
        state = breaker.current_state
        if state == "closed":
            return False
        if state == "open":
            opened_at = breaker._state_storage.opened_at
            timeout = timedelta(seconds=breaker.reset_timeout)
            if opened_at and datetime.now(UTC) < opened_at + timeout:
                raise BreakerOpen(self.name)
            breaker.half_open()
        if self._probing:
            raise BreakerOpen(self.name)
        self._probing = True
        return True

    async def call(self, work: Callable[[], Awaitable[T]]) -> T:
        """Await ``work()`` through the breaker; BreakerOpen while it is open."""
        probe = self._admit()
        try:
            try:
                result = await work()
            except self.failures as exc:
                self._report(_raiser(exc))
                raise
            if probe or self._breaker.fail_counter:
                # a success only changes something after failures (or as the probe): the
                # storm's successes in a closed breaker with none skip pybreaker's lock
                self._report(lambda: None)
            return result
        finally:
            if probe:
                self._probing = False

    def _report(self, outcome: Callable[[], None]) -> None:
        # the outcome was decided by the await; pybreaker only counts it
        try:
            self._breaker.call(outcome)
        except pybreaker.CircuitBreakerError:
            pass  # this report tripped it, or another call had opened it meanwhile
        except self.failures:
            pass  # the failure being reported, re-raised by pybreaker


def _raiser(exc: BaseException) -> Callable[[], None]:
    def outcome() -> None:
        raise exc

    return outcome
