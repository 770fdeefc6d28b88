"""Rehearse a flash sale and get a verdict, in one command.

    .venv/bin/python loadtest/run.py --users 2000 --spawn-rate 1000 --duration 20 --stock 500

It starts `seckill up --fake-wechatpay` in a temporary directory unless --gateway points at a
running one (paying shoppers then pay through the local WeChat Pay: prepay, wx.requestPayment,
the signed notification; `--payments hmac` keeps the generic signed callback instead),
defines a sale starting once the whole crowd has arrived, mints every user's token ahead of
time, runs locust headless (CSV and HTML report in --out), waits for the order writer to
persist what was accepted, asks the gateway for the activity report, prints the figures, and
exits 0 on PASS, 1 on FAIL: PASS only if nothing was oversold, no user exceeded the limit,
every accepted order is in the store, a bot won no more often per head than a shopper
(--max-win-ratio) and risk rules refused few shoppers (--max-shoppers-refused).

--risk off starts the gateway with every risk rule off (the sale as it was before them);
--register makes everyone register before the sale (the fair sale's registration endpoint).
--admission lottery makes it a lottery sale (registration opens now, everyone registers before
the start, shoppers follow the queue, each admitted turn has --claim-window seconds); after the
sale `seckill draw verify` must verify the draw, or the verdict is FAIL.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from verdict import (  # noqa: E402
    MAX_SHOPPERS_REFUSED,
    MAX_WIN_RATIO,
    MIN_SHOPPERS_ANSWERED,
    Fairness,
    judge,
    read_stats,
    render,
)

from seckill import settings as settings_module  # noqa: E402
from seckill.auth import UserAuth  # noqa: E402
from seckill.embedded import free_port  # noqa: E402


def _call(method: str, url: str, token: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


# every risk rule off: the sale as it ran before them (--risk off)
RISK_OFF = "".join(
    f'[{rule}]\nmode = "off"\n{extra}\n'
    for rule, extra in (
        ("deny", ""),
        ("device_accounts", "max_accounts = 1\n"),
        ("address_orders", "max_orders = 1\n"),
        ("user_velocity", "window_s = 60\nmax_attempts = 1\n"),
        ("device_velocity", "window_s = 60\nmax_attempts = 1\n"),
        ("ip_velocity", "window_s = 60\nmax_attempts = 1\n"),
    )
)


def _start_gateway(work: Path, risk: str, wechatpay: bool) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    if risk == "off":
        (work / "risk-off.toml").write_text(RISK_OFF)
        env["SECKILL_RISK_RULES_PATH"] = str(work / "risk-off.toml")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "seckill",
            "--log-level",
            "WARNING",
            "up",
            "--port",
            str(free_port()),
            *(["--fake-wechatpay"] if wechatpay else []),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("seckill serving on"):
        raise SystemExit(f"seckill up did not start: {line!r}")
    return process, line.split()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--spawn-rate", type=float, default=1000, help="users/s (<= 2000)")
    parser.add_argument("--duration", type=float, default=20, help="seconds after the start")
    parser.add_argument("--stock", type=int, default=200)
    parser.add_argument("--per-user-limit", type=int, default=1)
    parser.add_argument(
        "--buckets",
        type=int,
        default=1,
        help="split the stock over this many buckets (slots: a hot item on a Redis Cluster)",
    )
    parser.add_argument("--price-cents", type=int, default=100)
    parser.add_argument("--payment-timeout", type=int, default=5, help="seconds to pay")
    parser.add_argument("--gateway", help="URL of a running gateway (default: start seckill up)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--ops", action="store_true", help="an ops user flips a flag mid-sale")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="locust workers on this machine (0: one process); see RESULTS.md for machines",
    )
    parser.add_argument("--drain-timeout", type=float, default=120)
    parser.add_argument(
        "--payments",
        choices=["wechatpay", "hmac"],
        help="how paying shoppers pay (default: wechatpay through the local WeChat Pay when this "
        "starts the gateway, hmac callbacks with --gateway)",
    )
    parser.add_argument(
        "--risk",
        choices=["on", "off"],
        default="on",
        help="on: the shipped config/risk.toml; off: every risk rule off (started gateway only)",
    )
    parser.add_argument("--register", action="store_true", help="everyone registers first")
    parser.add_argument(
        "--admission",
        choices=["fcfs", "lottery"],
        default="fcfs",
        help="lottery: registration, a drawn order, turns (implies --register)",
    )
    parser.add_argument(
        "--claim-window", type=int, default=15, help="seconds an admitted turn lasts (lottery)"
    )
    parser.add_argument(
        "--lead",
        type=float,
        help="seconds from now to the start (default: the spawn time + 3 s, and with "
        "registration 1 s per 1,500 users more so every registration is answered in time)",
    )
    parser.add_argument("--max-win-ratio", type=float, default=MAX_WIN_RATIO)
    parser.add_argument("--max-shoppers-refused", type=float, default=MAX_SHOPPERS_REFUSED)
    parser.add_argument(
        "--min-shoppers-answered", type=float, default=MIN_SHOPPERS_ANSWERED,
        help="share of shoppers that must get an answer before the run ends (FAIL below it)",
    )  # fmt: skip
    parser.add_argument(
        "--break-invariant", action="store_true", help=argparse.SUPPRESS
    )  # tests: corrupt the store before judging, so FAIL can be seen to happen
    parser.add_argument(
        "--break-draw", action="store_true", help=argparse.SUPPRESS
    )  # tests: change the lottery's seed before verifying, so the draw can be seen to fail
    args = parser.parse_args(argv)
    lottery = args.admission == "lottery"
    register = args.register or lottery

    began = time.monotonic()
    settings = settings_module.load()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(str(args.out / "outcomes-*.json")):
        os.unlink(stale)
    work = Path(tempfile.mkdtemp(prefix="seckill-loadtest-"))
    gateway_process = None
    url = args.gateway
    payments = args.payments or ("hmac" if url else "wechatpay")
    wechatpay_url = ""
    if url is None:
        gateway_process, url = _start_gateway(work, args.risk, payments == "wechatpay")
        if payments == "wechatpay":
            wechatpay_url = _fake_wechatpay_url(work)
    elif payments == "wechatpay":
        # a running `seckill up --fake-wechatpay`: the URL of its local WeChat Pay
        wechatpay_url = os.environ.get("SECKILL_LT_WECHATPAY_URL", "")
        if not wechatpay_url:
            raise SystemExit("--payments wechatpay with --gateway needs SECKILL_LT_WECHATPAY_URL")
    try:
        admin = settings.admin.token
        activity_id = f"lt-{int(time.time())}"
        lead_s = args.lead
        if lead_s is None:  # the crowd is complete (and registered) before the start
            lead_s = args.users / args.spawn_rate + 3 + (args.users / 1500 if register else 0)
        start = datetime.now(tz=UTC) + timedelta(seconds=lead_s)
        _call(
            "POST",
            f"{url}/admin/v1/activities",
            admin,
            {
                "id": activity_id,
                "sku_id": "sku-lt",
                "title": "load test",
                "stock": args.stock,
                "price_cents": args.price_cents,
                "per_user_limit": args.per_user_limit,
                **({"buckets": args.buckets} if args.buckets > 1 else {}),
                "payment_timeout_s": args.payment_timeout,
                "requires_address": True,  # it ships: bots need an address as much as shoppers
                **({"registration_opens_at": datetime.now(tz=UTC).isoformat()} if register else {}),
                **(
                    {"admission": "lottery", "claim_window_s": args.claim_window} if lottery else {}
                ),
                "starts_at": start.isoformat(),
                "ends_at": (start + timedelta(seconds=args.duration + 60)).isoformat(),
            },
        )
        tokens = work / "tokens.tsv"
        auth = UserAuth(settings.jwt.secret)
        ttl = int(lead_s + args.duration + 3600)
        with tokens.open("w") as handle:  # minted ahead: no signing during the run
            for n in range(args.users):
                # the openid claim: WeChat Pay's payer (a real one comes from wx.login)
                token = auth.mint(f"lt{n}", ttl, openid=f"o-lt{n}")
                handle.write(f"lt{n}\t{token}\n")
        env = {
            **os.environ,
            "SECKILL_LT_ACTIVITY": activity_id,
            "SECKILL_LT_START_AT": str(start.timestamp()),
            "SECKILL_LT_TOKENS": str(tokens),
            "SECKILL_LT_PAYMENT_SECRET": settings.payment.secret,
            "SECKILL_LT_ADMIN_TOKEN": admin,
            "SECKILL_LT_PRICE_CENTS": str(args.price_cents),
            "SECKILL_LT_OUT": str(args.out),
            "SECKILL_LT_USERS": str(args.users),
            "SECKILL_LT_SPAWN_RATE": str(args.spawn_rate),
            "SECKILL_LT_DURATION_S": str(args.duration),
            "SECKILL_LT_OPS": "1" if args.ops else "0",
            "SECKILL_LT_WORKERS": str(max(args.workers, 1)),
            "SECKILL_LT_WECHATPAY_URL": wechatpay_url,
            "SECKILL_LT_REGISTER": "1" if register else "0",
            "SECKILL_LT_ADMISSION": args.admission,
        }
        # for workers on other machines: `set -a; . loadtest/out/env; set +a`
        (args.out / "env").write_text(
            "".join(f"{k}={v}\n" for k, v in sorted(env.items()) if k.startswith("SECKILL_LT_"))
        )
        locustfile = str(HERE / "locustfile.py")
        master = [sys.executable, "-m", "locust", "-f", locustfile, "--headless", "--host", url,
                  "--csv", str(args.out / "seckill"), "--html", str(args.out / "report.html"),
                  "--only-summary", "--loglevel", "INFO"]  # fmt: skip
        workers = []
        if args.workers:
            master += ["--master", "--expect-workers", str(args.workers)]
            workers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "locust",
                        "-f",
                        locustfile,
                        "--worker",
                        "--master-host",
                        "127.0.0.1",
                        "--loglevel",
                        "WARNING",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for _ in range(args.workers)
            ]
        locust = subprocess.run(
            master, env=env, timeout=lead_s + args.duration + 300, capture_output=True, text=True
        )
        for worker in workers:
            worker.wait(60)
        # the largest locust process's peak (ru_maxrss of the children waited for, in KiB)
        peak_rss_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        for line in locust.stderr.splitlines():
            if "missing" in line or "Timeout waiting" in line:
                print(f"locust: {line.strip()}", file=sys.stderr)  # a worker lost: a short test
        if locust.returncode not in (0, 1):  # 1: some requests failed, judged below
            print(locust.stderr[-3000:], file=sys.stderr)
            return 2
        report = _drained_report(url, admin, activity_id, args)
        if args.break_invariant:
            _lose_a_stored_order(work)
            report = _drained_report(url, admin, activity_id, args)  # the gateway must see it
        outcomes: dict[str, int] = {}
        accepted: set[str] = set()
        files = [
            json.loads(Path(path).read_text())
            for path in glob.glob(str(args.out / "outcomes-*.json"))
        ]
        for data in files:
            for key, value in data["outcomes"].items():
                outcomes[key] = outcomes.get(key, 0) + value
            accepted.update(data["accepted"])
        fairness = Fairness.from_outcomes(files)
        answered = sum(int(data.get("answered", 0)) for data in files)
        if lottery and args.break_draw:
            _change_the_seed(work, activity_id)
        draw = _verify_draw(work, activity_id) if lottery else None
        stats = read_stats(args.out / "seckill_stats.csv")
        history = read_stats(args.out / "seckill_stats_history.csv")
        reached = max((int(row["User Count"]) for row in history), default=0)
        verdict = judge(
            report,
            accepted,
            fairness,
            args.max_win_ratio,
            args.max_shoppers_refused,
            draw_verified=None if draw is None else bool(draw.get("verified")),
            answered=answered,
            min_answered=args.min_shoppers_answered,
        )
        print(render(verdict, report, stats, outcomes, reached, args.users, fairness, draw))
        print(
            f"load generator peak RSS: {peak_rss_mb:,} MB (largest locust process); "
            f"wall time: {time.monotonic() - began:.0f} s"
        )
        if fairness.shoppers:
            print(
                f"shoppers answered: {answered:,} of {fairness.shoppers:,}"
                f" ({answered / fairness.shoppers:.1%})"
            )
        (args.out / "verdict.json").write_text(
            json.dumps(
                {
                    "passed": verdict.passed,
                    "reasons": verdict.reasons,
                    "report": report,
                    "outcomes": outcomes,
                    "users_reached": reached,
                    "users_wanted": args.users,
                    "risk": args.risk,
                    "admission": args.admission,
                    "draw": draw,
                    "shoppers_answered": answered,
                    "wall_time_s": round(time.monotonic() - began, 1),
                    "load_generator_peak_rss_mb": peak_rss_mb,
                    "fairness": {
                        "shoppers": fairness.shoppers,
                        "bots": fairness.bots,
                        "shopper_wins": fairness.shopper_wins,
                        "bot_wins": fairness.bot_wins,
                        "shopper_rate": fairness.shopper_rate,
                        "bot_rate": fairness.bot_rate,
                        "ratio": None if fairness.ratio == float("inf") else fairness.ratio,
                        "shoppers_refused": fairness.shoppers_refused,
                        "shoppers_refused_share": fairness.refused_share,
                        "bots_refused": fairness.bots_refused,
                    },
                },
                indent=2,
            )
        )
        return 0 if verdict.passed else 1
    finally:
        if gateway_process is not None:
            gateway_process.terminate()
            gateway_process.wait(60)


def _fake_wechatpay_url(work: Path) -> str:
    """The local WeChat Pay's URL, from the merchant settings `up --fake-wechatpay` wrote."""
    env_file = work / "var" / "wechatpay" / "wechatpay.env"
    deadline = time.monotonic() + 10
    while not env_file.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"seckill up --fake-wechatpay wrote no {env_file}")
        time.sleep(0.05)
    for line in env_file.read_text().splitlines():
        name, _, value = line.partition("=")
        if name == "SECKILL_WECHATPAY_BASE_URL":
            return value
    raise SystemExit(f"no SECKILL_WECHATPAY_BASE_URL in {env_file}")


def _change_the_seed(work: Path, activity_id: str) -> None:
    """Swap the lottery's stored seed for another (tests: `draw verify` must then fail)."""
    import redis

    from seckill import keys, lottery

    url = (work / "var" / "redis.url").read_text(encoding="utf-8").strip()
    client = redis.Redis.from_url(url)
    try:
        client.hset(keys.draw(activity_id), "seed", lottery.new_seed())
    finally:
        client.close()


def _verify_draw(work: Path, activity_id: str) -> dict[str, Any]:
    """`seckill draw verify` beside the `seckill up` this started (or the Redis the environment
    names): its JSON, with "verified" false when it does not verify or could not run."""
    env = dict(os.environ)
    if (work / "var" / "redis.url").exists():
        env = {k: v for k, v in env.items() if not k.startswith("SECKILL_")}
    done = subprocess.run(
        [sys.executable, "-m", "seckill", "--log-level", "WARNING", "draw", "verify", activity_id],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        result = {"verified": False, "problems": [done.stderr.strip()[-500:] or "no output"]}
    result["exit_code"] = done.returncode
    if done.returncode != 0:
        result["verified"] = False
    return result


def _drained_report(url: str, admin: str, activity_id: str, args: Any) -> dict[str, Any]:
    """The report once the writer has persisted everything (or the drain timeout passed)."""
    deadline = time.monotonic() + args.drain_timeout
    while True:
        report: dict[str, Any] = _call(
            "GET", f"{url}/admin/v1/activities/{activity_id}/report", admin
        )
        settled = report["orders_pending_write"] == 0 and report["changes_pending_write"] == 0
        if settled or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


def _lose_a_stored_order(work: Path) -> None:
    """Delete one stored order behind everyone's back (tests: the verdict must say FAIL)."""
    import sqlite3

    with sqlite3.connect(work / "var" / "orders.db") as db:
        db.execute("DELETE FROM orders WHERE rowid = (SELECT MIN(rowid) FROM orders)")


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except urllib.error.URLError as exc:
        raise SystemExit(f"gateway unreachable: {exc}") from exc
