"""The verdict of a load test: PASS only if the sale held every invariant.

Pure functions over the gateway's activity report and what the load generator saw, so the
logic is tested on its own and on a real run.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)


def judge(report: dict[str, Any], accepted_order_ids: set[str]) -> Verdict:
    """PASS iff nothing was oversold, no user went over the limit, every order is stored."""
    reasons: list[str] = []
    sold = report["reserved"] + report["paid"]
    if sold > report["initial_stock"]:
        reasons.append(f"OVERSOLD: {sold} reserved+paid > stock {report['initial_stock']}")
    if report["initial_stock"] != report["available"] + sold:
        reasons.append(
            f"stock does not add up: {report['available']} available + {sold} sold"
            f" != {report['initial_stock']}"
        )
    over = [p for p in report.get("problems", []) if "per-user limit" in p]
    if over:
        reasons.append(f"users over the limit: {over[0]}")
    if report["orders_pending_write"] != 0:
        reasons.append(f"{report['orders_pending_write']} accepted orders not yet in the store")
    if report["orders_in_store"] != report["orders_created"]:
        reasons.append(
            f"{report['orders_in_store']} orders in the store != {report['orders_created']}"
            " accepted"
        )
    if len(accepted_order_ids) > report["orders_created"]:
        reasons.append(
            f"the load generator saw {len(accepted_order_ids)} distinct 202s but the gateway"
            f" counts {report['orders_created']}"
        )
    if not report.get("consistent", False):
        reasons.append("report inconsistent: " + "; ".join(report.get("problems", [])))
    return Verdict(passed=not reasons, reasons=reasons)


def read_stats(csv_path: Path) -> list[dict[str, str]]:
    """Locust's <prefix>_stats.csv rows."""
    with csv_path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def render(
    verdict: Verdict,
    report: dict[str, Any],
    stats: list[dict[str, str]],
    outcomes: dict[str, int],
    users_reached: int,
    users_wanted: int,
) -> str:
    """The printed summary: users, throughput, latency per endpoint, outcomes, verdict."""
    lines = [f"users reached: {users_reached:,} of {users_wanted:,}"]
    total = next((row for row in stats if row["Name"] == "Aggregated"), None)
    if total:
        lines.append(f"requests/s (whole run): {float(total['Requests/s']):,.0f}")
    lines.append("")
    lines.append(f"{'endpoint':<40} {'requests':>10} {'req/s':>9} {'p50':>7} {'p95':>7} {'p99':>7}")
    for row in stats:
        if row["Name"] == "Aggregated":
            continue
        lines.append(
            f"{row['Type'] + ' ' + row['Name']:<40} {int(row['Request Count']):>10,}"
            f" {float(row['Requests/s']):>9,.0f} {row['50%']:>6}ms {row['95%']:>6}ms"
            f" {row['99%']:>6}ms"
        )
    lines.append("")
    lines.append("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items())))
    lines.append(
        f"activity: stock {report['initial_stock']}, reserved {report['reserved']}, paid"
        f" {report['paid']}, released {report['released']}, available {report['available']};"
        f" orders created {report['orders_created']}, in store {report['orders_in_store']},"
        f" pending {report['orders_pending_write']}"
    )
    lines.append("")
    lines.append("VERDICT: PASS" if verdict.passed else "VERDICT: FAIL")
    lines.extend(f"  - {reason}" for reason in verdict.reasons)
    return "\n".join(lines)
