"""Every set of KEYS seckill hands one script lies in one Redis Cluster slot.

A script's keys must hash to one slot, or Redis Cluster refuses the call (CROSSSLOT). Each
``keys.*_keys`` helper spells one script's KEYS; its keys share the activity's hash tag.
The scripts' own use of their KEYS is audited at run time (tests/scriptaudit.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from redis.crc import key_slot

from seckill import keys

HELPERS = sorted(
    (name, function)
    for name, function in vars(keys).items()
    if name.endswith("_keys") and inspect.isfunction(function)
)
SAMPLES: dict[str, Any] = {"fair": True, "provider": "wechatpay", "ip": "203.0.113.9"}


def test_the_helpers_are_found() -> None:
    assert len(HELPERS) >= 10, [name for name, _ in HELPERS]


@pytest.mark.parametrize(("name", "helper"), HELPERS, ids=[name for name, _ in HELPERS])
@pytest.mark.parametrize("activity_id", ["a1", "spring-sale_2026", "x" * 64])
def test_a_helpers_keys_share_one_slot(
    name: str, helper: Callable[..., list[str]], activity_id: str
) -> None:
    arguments = {
        # a key space is an activity's own, or one of its buckets' (which has a tag of its own)
        parameter: SAMPLES.get(
            parameter, activity_id if parameter in ("activity_id", "space") else f"v{n}"
        )
        for n, parameter in enumerate(inspect.signature(helper).parameters)
    }
    spelled = helper(**arguments)
    assert spelled, name
    slots = {key_slot(key.encode()) for key in spelled}
    assert slots == {key_slot(keys.meta(activity_id).encode())}, (name, spelled)
