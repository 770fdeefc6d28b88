"""RFC 3339 in and out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seckill import clock


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2026-11-22T10:00:00.250Z", 1_795_341_600_250),
        ("2026-11-22T18:00:00+08:00", 1_795_341_600_000),
    ],
)
def test_parse(text: str, ms: int) -> None:
    assert clock.parse_rfc3339(text) == ms


@pytest.mark.parametrize(
    "text", ["2026-11-22", "2026-11-22T10:00:00", "tomorrow", "", "2026-13-01T00:00:00Z"]
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        clock.parse_rfc3339(text)


@pytest.mark.parametrize("ms", [0, 1_795_341_600_250, -47_728_590_363_414, 253_402_300_799_999])
def test_format_round_trips_with_four_digit_years(ms: int) -> None:
    text = clock.to_rfc3339(ms)
    assert len(text.split("-")[0]) == 4 and text.endswith("Z")
    assert clock.parse_rfc3339(text) == ms


@given(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999))
def test_formatting_from_cached_seconds_matches_datetime(ms: int) -> None:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    expected = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert clock.to_rfc3339(ms) == expected
    assert clock.to_rfc3339(ms) == expected  # and again, from the cache
