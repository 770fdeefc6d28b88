"""Non-core reads (reviews, recommendations): proxied with a timeout and a breaker each.

When the upstream fails, times out, its breaker is open, its flag is off or it is not
configured, the answer is still 200: the last good payload for that activity (or an empty
one) marked ``"degraded": true``. A flash sale's page must render whatever those services do.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import aiohttp

from seckill.breakers import AsyncBreaker, BreakerOpen

log = logging.getLogger(__name__)

_CACHE_MAX = 10_000


class UpstreamError(Exception):
    """The upstream did not answer usefully (connection, timeout, 5xx, not JSON)."""


class Upstream:
    def __init__(
        self,
        name: str,
        url_template: str,
        *,
        timeout_s: float,
        fail_max: int,
        reset_timeout_s: float,
    ) -> None:
        self.name = name
        self.url_template = url_template
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.breaker = AsyncBreaker(
            f"upstream:{name}",
            fail_max=fail_max,
            reset_timeout_s=reset_timeout_s,
            failures=(UpstreamError,),
        )
        self.fallbacks = 0
        self._last_good: OrderedDict[str, Any] = OrderedDict()

    async def fetch(
        self, session: aiohttp.ClientSession, activity_id: str, enabled: bool
    ) -> dict[str, Any]:
        """The body to answer: the upstream's items, or the fallback marked degraded."""
        if enabled and self.url_template:
            try:
                items = await self.breaker.call(lambda: self._get(session, activity_id))
            except (UpstreamError, BreakerOpen) as exc:
                log.debug("%s fallback for %s: %r", self.name, activity_id, exc)
            else:
                self._remember(activity_id, items)
                return {"activity_id": activity_id, "items": items, "degraded": False}
        self.fallbacks += 1
        return {
            "activity_id": activity_id,
            "items": self._last_good.get(activity_id, []),
            "degraded": True,
        }

    async def _get(self, session: aiohttp.ClientSession, activity_id: str) -> Any:
        url = self.url_template.format(activity_id=activity_id)
        try:
            async with session.get(url, timeout=self.timeout) as response:
                if response.status >= 500:
                    raise UpstreamError(f"{self.name} answered {response.status}")
                if response.status != 200:
                    return []  # the upstream knows nothing of this activity: not a failure
                return await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise UpstreamError(f"{self.name}: {exc!r}") from exc

    def _remember(self, activity_id: str, items: Any) -> None:
        self._last_good[activity_id] = items
        self._last_good.move_to_end(activity_id)
        while len(self._last_good) > _CACHE_MAX:
            self._last_good.popitem(last=False)
