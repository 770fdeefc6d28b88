"""The verdict of a load test: PASS only if the sale held every invariant and was fair.

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


# the bar a fair sale clears: a bot wins no more often per head than a shopper, and risk
# rules refuse at most one shopper in 200
MAX_WIN_RATIO = 1.0
MAX_SHOPPERS_REFUSED = 0.005
# and the storm was served: at most one shopper in 100 never got an answer to its buy (or its
# place in the queue) before the run ended
MIN_SHOPPERS_ANSWERED = 0.99


@dataclass(frozen=True)
class Fairness:
    """Who won, per role: users, distinct orders won, users a risk rule refused."""

    shoppers: int
    bots: int
    shopper_wins: int
    bot_wins: int
    shoppers_refused: int
    bots_refused: int = 0

    @property
    def shopper_rate(self) -> float:
        """Orders won per shopper."""
        return self.shopper_wins / self.shoppers if self.shoppers else 0.0

    @property
    def bot_rate(self) -> float:
        """Orders won per bot account."""
        return self.bot_wins / self.bots if self.bots else 0.0

    @property
    def ratio(self) -> float:
        """Bots' per-capita win rate over shoppers' (inf: bots won, shoppers did not)."""
        if self.shopper_rate == 0:
            return float("inf") if self.bot_rate > 0 else 0.0
        return self.bot_rate / self.shopper_rate

    @property
    def refused_share(self) -> float:
        """Shoppers refused by a risk rule (false positives), as a share of shoppers."""
        return self.shoppers_refused / self.shoppers if self.shoppers else 0.0

    @classmethod
    def from_outcomes(cls, files: list[dict[str, Any]]) -> Fairness:
        """Summed over the load processes' outcomes-<pid>.json."""
        users: dict[str, int] = {}
        won: dict[str, set[str]] = {"shopper": set(), "bot": set()}
        refused: dict[str, set[str]] = {"shopper": set(), "bot": set()}
        for data in files:
            for role, count in data.get("users", {}).items():
                users[role] = users.get(role, 0) + count
            for role, ids in data.get("won", {}).items():
                won.setdefault(role, set()).update(ids)
            for role, ids in data.get("risk_refused", {}).items():
                refused.setdefault(role, set()).update(ids)
        return cls(
            shoppers=users.get("shopper", 0),
            bots=users.get("bot", 0),
            shopper_wins=len(won["shopper"]),
            bot_wins=len(won["bot"]),
            shoppers_refused=len(refused["shopper"]),
            bots_refused=len(refused["bot"]),
        )


def judge(
    report: dict[str, Any],
    accepted_order_ids: set[str],
    fairness: Fairness | None = None,
    max_ratio: float = MAX_WIN_RATIO,
    max_refused: float = MAX_SHOPPERS_REFUSED,
    draw_verified: bool | None = None,
    answered: int | None = None,
    min_answered: float = MIN_SHOPPERS_ANSWERED,
) -> Verdict:
    """PASS iff nothing was oversold, no user went over the limit, every order is stored,
    (given ``fairness``) bots won no more often per head than shoppers and risk rules refused
    few enough shoppers, (given ``answered``) at least ``min_answered`` of the shoppers were
    answered, and (a lottery: ``draw_verified`` not None) the draw verified."""
    reasons: list[str] = []
    if answered is not None and fairness is not None and fairness.shoppers:
        share = answered / fairness.shoppers
        if share < min_answered:
            reasons.append(
                f"NOT SERVED: {answered} of {fairness.shoppers} shoppers answered ({share:.1%};"
                f" at least {min_answered:.0%})"
            )
    if draw_verified is False:
        reasons.append("DRAW NOT VERIFIED: `seckill draw verify` did not verify the lottery")
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
    if fairness is not None and fairness.bots and fairness.shoppers:
        if fairness.ratio > max_ratio:
            reasons.append(
                f"UNFAIR: a bot won {fairness.ratio:.2f}x as often as a shopper per head"
                f" ({fairness.bot_rate:.4f} vs {fairness.shopper_rate:.4f}; at most"
                f" {max_ratio:.2f}x)"
            )
        if fairness.refused_share > max_refused:
            reasons.append(
                f"risk rules refused {fairness.shoppers_refused} shoppers"
                f" ({fairness.refused_share:.2%}; at most {max_refused:.2%})"
            )
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
    fairness: Fairness | None = None,
    draw: dict[str, Any] | None = None,
) -> str:
    """The printed summary: users, throughput, latency per endpoint, outcomes, fairness,
    verdict."""
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
    if fairness is not None:
        ratio = "n/a" if fairness.ratio == float("inf") else f"{fairness.ratio:.2f}x"
        lines.append(
            f"fairness: shoppers {fairness.shoppers:,} won {fairness.shopper_wins:,}"
            f" ({fairness.shopper_rate:.4f} per head); bots {fairness.bots:,} won"
            f" {fairness.bot_wins:,} ({fairness.bot_rate:.4f} per head); bot/shopper {ratio}"
        )
        lines.append(
            f"risk rules refused {fairness.shoppers_refused:,} shoppers"
            f" ({fairness.refused_share:.2%}) and {fairness.bots_refused:,} bots"
        )
    if draw is not None:
        lines.append(
            f"draw: {'verified' if draw.get('verified') else 'NOT verified'}"
            f" ({draw.get('registrants', '?')} registrants, commitment"
            f" {str(draw.get('commitment', '?'))[:16]}...)"
            + "".join(f"; {problem}" for problem in draw.get("problems") or [])
        )
    lines.append("")
    lines.append("VERDICT: PASS" if verdict.passed else "VERDICT: FAIL")
    lines.extend(f"  - {reason}" for reason in verdict.reasons)
    return "\n".join(lines)
