"""Token buckets. The local bucket costs no network round trip."""

from __future__ import annotations

import asyncio
import time


class LocalBucket:
    """A token bucket in this process: ``rate`` tokens per second, at most ``burst`` saved."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_take(self, tokens: float = 1.0) -> float:
        """Take ``tokens`` now and return 0, or take nothing and return the seconds to wait."""
        self._refill()
        if self._tokens >= tokens:
            self._tokens -= tokens
            return 0.0
        return (tokens - self._tokens) / self.rate

    async def take(self, tokens: float) -> None:
        """Wait until ``tokens`` can be taken (more than ``burst``: in burst-sized steps)."""
        while tokens > 0:
            step = min(tokens, self.burst)
            wait = self.try_take(step)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            tokens -= step
