"""Wall-clock helpers: epoch milliseconds in, RFC 3339 UTC out."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_ms() -> int:
    """Current time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


# whole seconds already formatted: every 202 of a storm names an expiry within a few seconds
_SECONDS: dict[int, str] = {}
_SECONDS_MAX = 256


def to_rfc3339(ms: int) -> str:
    """Epoch ms as RFC 3339 UTC with millisecond precision, e.g. 2026-11-22T10:00:00.000Z."""
    second, milli = divmod(ms, 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) >= _SECONDS_MAX:
            _SECONDS.clear()
        # isoformat zero-pads the year (strftime's %Y does not on every platform)
        prefix = (_EPOCH + timedelta(seconds=second)).isoformat().removesuffix("+00:00")
        _SECONDS[second] = prefix
    return f"{prefix}.{milli:03d}Z"


def parse_rfc3339(text: str) -> int:
    """RFC 3339 timestamp (any offset, 'Z' allowed) as epoch ms; ValueError otherwise."""
    if not isinstance(text, str) or len(text) < 20 or text[10] not in "Tt":
        raise ValueError("expected an RFC 3339 timestamp such as 2026-11-22T10:00:00Z")
    normalized = text[:-1] + "+00:00" if text[-1] in "Zz" else text
    moment = datetime.fromisoformat(normalized)
    if moment.tzinfo is None:
        raise ValueError("timestamp needs a time zone offset (use Z for UTC)")
    return int(moment.timestamp() * 1000)
