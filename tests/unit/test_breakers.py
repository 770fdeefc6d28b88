"""The asyncio breaker adapter: it trips on awaited failures, never on coroutine creation."""

from __future__ import annotations

import asyncio

import pytest

from seckill.breakers import AsyncBreaker, BreakerOpen


def _breaker(reset_s: float = 0.2) -> AsyncBreaker:
    return AsyncBreaker("test", fail_max=3, reset_timeout_s=reset_s, failures=(ConnectionError,))


async def _fail() -> None:
    await asyncio.sleep(0)
    raise ConnectionError("down")


async def _ok() -> str:
    await asyncio.sleep(0)
    return "ok"


async def test_it_trips_after_fail_max_awaited_failures_and_refuses_fast() -> None:
    breaker = _breaker()
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(_fail)
    assert breaker.state == "closed"
    with pytest.raises(ConnectionError):
        await breaker.call(_fail)
    assert breaker.state == "open"
    called = False

    async def spy() -> None:
        nonlocal called
        called = True

    with pytest.raises(BreakerOpen):
        await breaker.call(spy)
    assert not called, "an open breaker never runs the call"


async def test_a_failing_coroutine_is_not_counted_as_a_success() -> None:
    """The trap: a decorator on an async def counts success when the coroutine is created."""
    breaker = _breaker()
    for _ in range(3):
        with pytest.raises(ConnectionError):
            await breaker.call(_fail)
    assert breaker.state == "open"


async def test_half_open_lets_exactly_one_probe_through_then_closes() -> None:
    breaker = _breaker(reset_s=0.1)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            await breaker.call(_fail)
    await asyncio.sleep(0.15)
    gate = asyncio.Event()

    async def slow_probe() -> str:
        await gate.wait()
        return "ok"

    probe = asyncio.create_task(breaker.call(slow_probe))
    await asyncio.sleep(0.01)
    assert breaker.state == "half-open"
    with pytest.raises(BreakerOpen):
        await breaker.call(_ok)  # a second caller while the probe is out
    gate.set()
    assert await probe == "ok"
    assert breaker.state == "closed"
    assert await breaker.call(_ok) == "ok"


async def test_a_failed_probe_opens_it_again() -> None:
    breaker = _breaker(reset_s=0.1)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            await breaker.call(_fail)
    await asyncio.sleep(0.15)
    with pytest.raises(ConnectionError):
        await breaker.call(_fail)
    assert breaker.state == "open"


async def test_business_outcomes_and_other_errors_never_trip_it() -> None:
    breaker = _breaker()

    async def refused() -> None:
        raise ValueError("sold out is an answer, not an outage")

    for _ in range(10):
        with pytest.raises(ValueError):
            await breaker.call(refused)
        assert await breaker.call(_ok) == "ok"
    assert breaker.state == "closed"
    assert breaker.transitions == 0
