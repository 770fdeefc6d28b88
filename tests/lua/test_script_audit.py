"""The audit that keeps scripts to their KEYS (tests/scriptaudit.py) does see a misuse."""

from __future__ import annotations

import redis

from seckill import keys
from tests.scriptaudit import ScriptAudit


def test_a_script_touching_a_key_outside_its_keys_is_named(
    script_audit: ScriptAudit, sync_redis: redis.Redis
) -> None:
    script_audit.checkpoint()
    sync_redis.eval("redis.call('SET', KEYS[1], 1) return redis.call('GET', 'sk:other')", 1, "k")
    assert script_audit.checkpoint() == ["EVAL touched b'sk:other' (GET), not in its KEYS"]


def test_keys_in_several_slots_are_named(
    script_audit: ScriptAudit, sync_redis: redis.Redis
) -> None:
    script_audit.checkpoint()
    declared = [keys.meta("a1"), keys.meta("a2")]
    sync_redis.eval("return redis.call('EXISTS', KEYS[1], KEYS[2])", 2, *declared)
    problems = script_audit.checkpoint()
    assert len(problems) == 1 and "KEYS in several slots" in problems[0]


def test_a_script_within_its_keys_passes(
    script_audit: ScriptAudit, sync_redis: redis.Redis
) -> None:
    script_audit.checkpoint()
    declared = keys.release_keys("a1")
    script = "for _, k in ipairs(KEYS) do redis.call('DEL', k) end redis.call('PUBLISH', 'c', 'm')"
    sync_redis.eval(script, len(declared), *declared)
    assert script_audit.checkpoint() == []
