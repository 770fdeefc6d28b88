"""The load-test harness: its verdict logic, and a small real run through locust."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "loadtest"))

from verdict import judge  # noqa: E402

GOOD: dict[str, Any] = {
    "initial_stock": 10,
    "available": 2,
    "reserved": 3,
    "paid": 5,
    "released": 4,
    "orders_created": 12,
    "orders_in_store": 12,
    "orders_pending_write": 0,
    "changes_pending_write": 0,
    "consistent": True,
    "problems": [],
}


def test_a_sound_sale_passes() -> None:
    assert judge(GOOD, {f"o{n}" for n in range(12)}).passed


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"reserved": 6, "available": 0, "consistent": False}, "OVERSOLD"),
        ({"orders_pending_write": 2, "orders_in_store": 10}, "not yet in the store"),
        ({"orders_in_store": 11, "consistent": False}, "in the store"),
        (
            {"consistent": False, "problems": ["1 users over the per-user limit, e.g. 'u'"]},
            "over the limit",
        ),
    ],
)
def test_a_broken_invariant_fails(change: dict[str, Any], reason: str) -> None:
    verdict = judge({**GOOD, **change}, set())
    assert not verdict.passed
    assert any(reason in r for r in verdict.reasons), verdict.reasons


def test_more_202s_than_the_gateway_counted_fails() -> None:
    assert not judge(GOOD, {f"o{n}" for n in range(13)}).passed


def _run(out: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtest" / "run.py"),
            "--users",
            "200",
            "--spawn-rate",
            "200",
            "--duration",
            "6",
            "--stock",
            "40",
            "--payment-timeout",
            "2",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    verdict = (
        json.loads((out / "verdict.json").read_text()) if (out / "verdict.json").exists() else {}
    )
    return done.returncode, verdict, done.stdout + done.stderr


def test_a_small_real_sale_passes_and_a_broken_one_fails(tmp_path: Path) -> None:
    code, verdict, output = _run(tmp_path / "ok")
    assert code == 0, output[-3000:]
    assert "VERDICT: PASS" in output
    assert verdict["users_reached"] == 200
    report = verdict["report"]
    assert report["orders_created"] >= 40, "the whole stock was sold at least once"
    assert report["reserved"] + report["paid"] <= 40
    outcomes = verdict["outcomes"]
    assert outcomes.get("accepted", 0) + outcomes.get("bot_accepted", 0) >= 40
    assert verdict["outcomes"].get("sold_out", 0) > 0
    assert verdict["outcomes"].get("bot_unauthorized", 0) > 0, "forged tokens were refused"
    assert outcomes.get("wechatpay_paid", 0) > 0, "payers paid through the local WeChat Pay"
    assert (tmp_path / "ok" / "report.html").exists()
    assert (tmp_path / "ok" / "seckill_stats.csv").exists()

    code, verdict, output = _run(tmp_path / "broken", "--break-invariant")
    assert code == 1, output[-3000:]
    assert "VERDICT: FAIL" in output
    assert not verdict["passed"]
