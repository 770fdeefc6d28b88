"""A flash sale as the crowd lives it. Run through loadtest/run.py (it sets the environment).

Shoppers open the activity, wait for the start second, buy with an Idempotency-Key (retrying
with the same key after 429/503, honouring Retry-After), poll their order, then pay (a share
of the winners), cancel (a few) or leave it to expire. With SECKILL_LT_WECHATPAY_URL (the local
WeChat Pay of `seckill up --fake-wechatpay`) a payer asks the gateway for the prepay, then
hands its request_payment parameters to the local WeChat Pay as wx.requestPayment would; the
gateway learns of it from WeChat Pay's signed notification. Without it the payer's provider
sends the generic signed callback.
Each has a phone of their own (X-Device-Id) and a home address; a few share both with one
other shopper (a family).

In a lottery sale (SECKILL_LT_ADMISSION=lottery) everyone registers before the start; a
shopper then polls GET /api/v1/activities/{id}/queue at a mini program's pace (never faster
than once a second: one second per hundred positions ahead, or half of eta_s if sooner, at
most a minute apart, and never sooner than a 429's Retry-After), buys once the
answer says `admitted` (409 not_your_turn: back to polling), and gives up when its turn has
passed, was used, or the sale ended.

Bots behave like a scalper's farm: many accounts on few phones (20 accounts per device),
one warehouse address per 50 accounts, firing before the start second because they trust no
clock, hammering with fresh Idempotency-Keys, replaying keys, sending forged tokens, polling
their orders faster than allowed, and never paying: a reservation is held until it expires
(reserve-and-abandon), then bought again. In a lottery sale they register every account
too and poll the queue far faster than allowed. An optional ops user flips a flag mid-sale.

Every user counts under its role (shopper, bot): how many there were, which orders they won,
which were refused by a risk rule; the verdict turns that into per-capita win rates.

Scale: users share one HTTP client pool (no socket per user), tokens are minted ahead of time
(no signing during the run), and a user whose story is over idles in a long sleep (a greenlet
that costs nothing). Environment (set by run.py):
  SECKILL_LT_ACTIVITY, SECKILL_LT_START_AT (epoch s), SECKILL_LT_TOKENS (file of user<TAB>jwt),
  SECKILL_LT_PAYMENT_SECRET, SECKILL_LT_ADMIN_TOKEN, SECKILL_LT_OUT (dir), SECKILL_LT_USERS,
  SECKILL_LT_SPAWN_RATE, SECKILL_LT_DURATION_S, SECKILL_LT_OPS ("1": the ops user runs),
  SECKILL_LT_PRICE_CENTS, SECKILL_LT_REGISTER ("1": everyone registers first, once
  POST /api/v1/activities/{id}/registration exists), SECKILL_LT_BOT_LEAD_S (how early bots
  start firing, default 1.5), SECKILL_LT_WECHATPAY_URL, SECKILL_LT_ADMISSION ("lottery":
  shoppers follow the queue).
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import itertools
import json
import os
import random
import time
import uuid
from collections import Counter
from typing import Any

import gevent
from geventhttpclient.client import HTTPClientPool
from locust import LoadTestShape, constant, events, runners, task
from locust.contrib.fasthttp import FastHttpUser

# Heartbeats a worker may miss (one a second) before the master counts it gone, and stops the
# whole test once none is left. When 50,000 shoppers of one worker wake in the start second,
# its loop can be busy with them for longer than locust's 3: the 100,000 rehearsal stopped
# itself that way at the start, every shopper still waiting (seen on 2026-12-07).
runners.HEARTBEAT_LIVENESS = 30

ACTIVITY = os.environ.get("SECKILL_LT_ACTIVITY", "loadtest")
START_AT = float(os.environ.get("SECKILL_LT_START_AT", "0"))
PAYMENT_SECRET = os.environ.get("SECKILL_LT_PAYMENT_SECRET", "").encode()
ADMIN_TOKEN = os.environ.get("SECKILL_LT_ADMIN_TOKEN", "")
PRICE = int(os.environ.get("SECKILL_LT_PRICE_CENTS", "100"))
OUT = os.environ.get("SECKILL_LT_OUT", ".")
ORDER_URL = f"/api/v1/activities/{ACTIVITY}/orders"
WECHATPAY_URL = os.environ.get("SECKILL_LT_WECHATPAY_URL", "")
REGISTRATION_URL = f"/api/v1/activities/{ACTIVITY}/registration"
REGISTER = os.environ.get("SECKILL_LT_REGISTER") == "1"
LOTTERY = os.environ.get("SECKILL_LT_ADMISSION") == "lottery"
QUEUE_URL = f"/api/v1/activities/{ACTIVITY}/queue"
END_AT = START_AT + float(os.environ.get("SECKILL_LT_DURATION_S", "30"))
# a queue answer after which a shopper stops polling: the turn is over, or never comes
FINAL_TURNS = {"passed", "used", "ended", "unplaced"}
BOT_LEAD_S = float(os.environ.get("SECKILL_LT_BOT_LEAD_S", "1.5"))
ACCOUNTS_PER_BOT_DEVICE = 20
ACCOUNTS_PER_WAREHOUSE = 50
# one shopper in 25 shares the phone, one in 20 the home, with the shopper before
FAMILY_PHONE_EVERY = 25
FAMILY_HOME_EVERY = 20

TOKENS: list[tuple[str, str]] = []
if os.environ.get("SECKILL_LT_TOKENS"):
    with open(os.environ["SECKILL_LT_TOKENS"], encoding="utf-8") as handle:
        TOKENS = [tuple(line.rstrip("\n").split("\t", 1)) for line in handle]  # type: ignore[misc]
_next_token = itertools.count()

OUTCOMES: Counter[str] = Counter()
ACCEPTED: set[str] = set()
# role -> users of that role started here / order ids they won / users a risk rule refused
USERS: Counter[str] = Counter()
WON: dict[str, set[str]] = {"shopper": set(), "bot": set()}
RISK_REFUSED: dict[str, set[str]] = {"shopper": set(), "bot": set()}
# shoppers the gateway answered during the sale: their buy (a 202 or a business refusal, not
# 429/503, a timeout or a lost socket), or in a lottery a queue answer after the start
ANSWERED: set[str] = set()
_TAG = f"{os.getpid()}"  # several load processes: their devices and addresses stay apart


@events.init.add_listener
def _offset_tokens(environment: Any, **_: Any) -> None:
    # distributed mode: each worker takes its own slice of the pre-minted tokens
    global _next_token
    index = getattr(environment.runner, "worker_index", 0) or 0
    workers = max(int(os.environ.get("SECKILL_LT_WORKERS", "1")), 1)
    _next_token = itertools.count(index * (len(TOKENS) // workers))


@atexit.register
def _write_outcomes() -> None:
    path = os.path.join(OUT, f"outcomes-{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(
            {
                "outcomes": OUTCOMES,
                "accepted": sorted(ACCEPTED),
                "users": USERS,
                "won": {role: sorted(ids) for role, ids in WON.items()},
                "risk_refused": {role: sorted(ids) for role, ids in RISK_REFUSED.items()},
                "answered": len(ANSWERED),
            },
            handle,
        )


def _identity() -> tuple[str, str]:
    user, token = TOKENS[next(_next_token) % len(TOKENS)]
    return user, token


def _outcome(response: Any) -> str:
    if response.status_code == 202:
        return "accepted"
    try:
        return str(json.loads(response.content)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"


def _retry_after(response: Any) -> float:
    try:
        return float(response.headers.get("Retry-After", "1"))
    except ValueError:
        return 1.0


def _sign(body: bytes) -> str:
    t = int(time.time())
    digest = hmac.new(PAYMENT_SECRET, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def _wait_for_start(jitter_s: float, lead_s: float = 0.0) -> None:
    delay = START_AT - lead_s - time.time() + random.uniform(0, jitter_s)
    if delay > 0:
        gevent.sleep(delay)


def _address(home: str) -> dict[str, str]:
    digits = int(hashlib.sha256(home.encode()).hexdigest()[:8], 16) % 10**8
    return {
        "name": f"Resident {home}",
        "phone": f"139{digits:08d}",
        "region": "Zhejiang Hangzhou",
        "detail": f"{home} Wensan Road",
    }


def _count_answer(role: str, user_id: str, response: Any) -> str:
    """The answer's outcome, counted under the user's role (wins and risk refusals noted)."""
    outcome = _outcome(response)
    OUTCOMES[outcome if role == "shopper" else f"bot_{outcome}"] += 1
    if response.status_code == 202:
        order_id = json.loads(response.content)["order_id"]
        ACCEPTED.add(order_id)
        WON[role].add(order_id)
    elif outcome == "risk_refused":
        RISK_REFUSED[role].add(user_id)
    return outcome


def _register(client: Any, headers: dict[str, str], name: str, role: str, user_id: str) -> None:
    """Registration before the sale (SECKILL_LT_REGISTER=1; the endpoint of the fair sale)."""
    with client.post(REGISTRATION_URL, headers=headers, name=name, catch_response=True) as r:
        prefix = "" if role == "shopper" else "bot_"
        OUTCOMES[f"{prefix}registration_{r.status_code}"] += 1
        if r.status_code == 403 and _outcome(r) == "risk_refused":
            RISK_REFUSED[role].add(user_id)  # a false positive, for a shopper
        r.success()


def _poll_interval(standing: dict[str, Any]) -> float:
    """How long a mini program waits before asking again: a second per hundred positions
    ahead, or half the ETA if that is sooner; 1 s to 60 s, jittered (2 s knowing neither)."""
    eta = standing.get("eta_s")
    ahead = standing.get("ahead")
    waits = []
    if isinstance(eta, int | float) and eta >= 0:
        waits.append(eta / 2)
    if isinstance(ahead, int) and ahead >= 0:
        waits.append(ahead / 100)
    wait = min(waits) if waits else 2.0
    return min(max(wait, 1.0), 60.0) * random.uniform(1.0, 1.3)


class Shopper(FastHttpUser):
    """One shopper: a story told once, then a long idle (cheap: a sleeping greenlet)."""

    weight = 50
    client_pool = HTTPClientPool(concurrency=64)
    wait_time = constant(3600)

    _count = itertools.count()

    def on_start(self) -> None:
        self.user_id, token = _identity()
        n = next(Shopper._count)
        USERS["shopper"] += 1
        phone = n - 1 if n % FAMILY_PHONE_EVERY == 1 else n
        home = n - 1 if n % FAMILY_HOME_EVERY == 1 else n
        self.auth = {
            "Authorization": f"Bearer {token}",
            "X-Device-Id": f"phone-{_TAG}-{phone}",
        }
        self.address = _address(f"home-{_TAG}-{home}")

    @task
    def story(self) -> None:
        self.client.get(f"/api/v1/activities/{ACTIVITY}", name="GET activity")
        if REGISTER or LOTTERY:
            _register(self.client, self.auth, "POST registration", "shopper", self.user_id)
        _wait_for_start(jitter_s=0.5)  # the whole crowd taps within the start second
        if LOTTERY:
            while self._wait_for_turn():
                if self._buy():
                    return
            return
        self._buy()

    def _wait_for_turn(self) -> bool:
        """Poll the queue at a mini program's pace until admitted (True) or the turn is over
        or the run is (False)."""
        while time.time() < END_AT:
            with self.client.get(
                QUEUE_URL, headers=self.auth, name="GET queue", catch_response=True
            ) as response:
                if response.status_code == 429:
                    OUTCOMES["queue_429"] += 1
                    response.success()
                    gevent.sleep(max(_retry_after(response), 1.0))
                    continue
                if response.status_code != 200:
                    OUTCOMES[f"queue_{_outcome(response)}"] += 1
                    if 400 <= response.status_code < 500 or response.status_code == 503:
                        response.success()
                    gevent.sleep(max(_retry_after(response), 2.0))
                    continue
                standing = json.loads(response.content)
            turn = standing.get("turn")
            if turn != "upcoming":
                ANSWERED.add(self.user_id)  # told where it stands in the sale
            if standing.get("admitted"):
                OUTCOMES["queue_admitted"] += 1
                return True
            if turn in FINAL_TURNS:
                OUTCOMES[f"queue_{turn}"] += 1
                return False
            gevent.sleep(_poll_interval(standing))
        OUTCOMES["queue_still_waiting_at_the_end"] += 1
        return False

    def _buy(self) -> bool:
        """One buy, retried with the same key after 429/503; then pay, cancel or leave. True
        when the story is over (False: not this shopper's turn yet, back to the queue)."""
        key = uuid.uuid4().hex
        order_id = None
        for _ in range(5):
            with self.client.post(
                ORDER_URL,
                json={"quantity": 1, "address": self.address},
                headers={**self.auth, "Idempotency-Key": key},
                name="POST order",
                catch_response=True,
            ) as response:
                outcome = _count_answer("shopper", self.user_id, response)
                if response.status_code in (202, 403, 409, 429, 503):
                    response.success()  # business answers, not load-test failures
                    if response.status_code not in (429, 503):
                        ANSWERED.add(self.user_id)
                else:
                    response.failure(f"unexpected {response.status_code}")
                if response.status_code == 202:
                    order_id = json.loads(response.content)["order_id"]
            if response.status_code in (429, 503):
                gevent.sleep(_retry_after(response))  # honour it, then retry with the same key
                continue
            if LOTTERY and outcome == "not_your_turn":
                gevent.sleep(max(_retry_after(response), 1.0))
                return False
            break
        if order_id is None:
            return True
        self.client.get(f"/api/v1/orders/{order_id}", headers=self.auth, name="GET order")
        fate = random.random()
        if fate < 0.6 and WECHATPAY_URL:
            self._pay_with_wechat(order_id)
        elif fate < 0.6:
            body = json.dumps(
                {
                    "event_id": uuid.uuid4().hex,
                    "order_id": order_id,
                    "amount_cents": PRICE,
                    "status": "SUCCESS",
                }
            ).encode()
            response = self.client.post(
                "/api/v1/payments/notify",
                data=body,
                name="POST notify",
                headers={"Seckill-Signature": _sign(body), "Content-Type": "application/json"},
            )
            OUTCOMES[f"payment_{_payment_result(response)}"] += 1
        elif fate < 0.7:
            self.client.post(
                f"/api/v1/orders/{order_id}/cancel", headers=self.auth, name="POST cancel"
            )
            OUTCOMES["cancelled"] += 1
        else:
            OUTCOMES["left_to_expire"] += 1
        return True

    def _pay_with_wechat(self, order_id: str) -> None:
        """Prepay at the gateway, then pay at the local WeChat Pay (wx.requestPayment)."""
        response = self.client.post(
            f"/api/v1/orders/{order_id}/payment", headers=self.auth, name="POST payment (prepay)"
        )
        if response.status_code != 200:
            OUTCOMES[f"wechatpay_prepay_{response.status_code}"] += 1
            return
        parameters = json.loads(response.content)["request_payment"]
        paid = self.client.post(
            f"{WECHATPAY_URL}/fake/request-payment",
            json={**parameters, "openid": f"o-{self.user_id}"},
            name="wx.requestPayment (local WeChat Pay)",
        )
        OUTCOMES["wechatpay_paid" if paid.status_code == 200 else "wechatpay_refused"] += 1


def _payment_result(response: Any) -> str:
    try:
        return str(json.loads(response.content)["result"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"


class Bot(FastHttpUser):
    """One account of a scalper's farm (see the module's docstring)."""

    weight = 1
    client_pool = HTTPClientPool(concurrency=16)
    wait_time = constant(0.05)
    _count = itertools.count()

    def on_start(self) -> None:
        self.user_id, token = _identity()
        n = next(Bot._count)
        USERS["bot"] += 1
        device = {"X-Device-Id": f"farm-{_TAG}-{n // ACCOUNTS_PER_BOT_DEVICE}"}
        self.auth = {"Authorization": f"Bearer {token}", **device}
        header, payload, _signature = token.split(".")
        self.forged = {"Authorization": f"Bearer {header}.{payload}.{'A' * 43}", **device}
        self.address = _address(f"warehouse-{_TAG}-{n // ACCOUNTS_PER_WAREHOUSE}")
        self.replayed_key = uuid.uuid4().hex
        self.held: str | None = None
        if REGISTER or LOTTERY:
            _register(self.client, self.auth, "POST registration (bot)", "bot", self.user_id)
        _wait_for_start(jitter_s=0.0, lead_s=BOT_LEAD_S)  # early: it trusts no clock

    @task(3)
    def hammer(self) -> None:
        self._post(self.auth, uuid.uuid4().hex, "POST order (bot)")

    @task(2)
    def replay(self) -> None:
        self._post(self.auth, self.replayed_key, "POST order (bot replay)")

    @task(1)
    def forged_token(self) -> None:
        self._post(self.forged, uuid.uuid4().hex, "POST order (forged)")

    @task(1)
    def poll(self) -> None:
        """Polls its reservation far faster than the order-read limit allows; never pays."""
        if self.held is None:
            return
        for _ in range(3):
            with self.client.get(
                f"/api/v1/orders/{self.held}",
                headers=self.auth,
                name="GET order (bot poll)",
                catch_response=True,
            ) as response:
                OUTCOMES[f"bot_poll_{response.status_code}"] += 1
                response.success()

    @task(2 if LOTTERY else 0)  # weight 0: not a task at all, fcfs bots' mix is unchanged
    def queue(self) -> None:
        """A lottery sale: asks for its turn in bursts, far faster than the queue allows."""
        for _ in range(3):
            with self.client.get(
                QUEUE_URL, headers=self.auth, name="GET queue (bot)", catch_response=True
            ) as response:
                OUTCOMES[f"bot_queue_{response.status_code}"] += 1
                response.success()

    def _post(self, auth: dict[str, str], key: str, name: str) -> None:
        with self.client.post(
            ORDER_URL,
            json={"quantity": 1, "address": self.address},
            headers={**auth, "Idempotency-Key": key},
            name=name,
            catch_response=True,
        ) as response:
            _count_answer("bot", self.user_id, response)
            if response.status_code == 202:
                self.held = json.loads(response.content)["order_id"]
            if response.status_code < 500 or response.status_code == 503:
                response.success()


class Ops(FastHttpUser):
    """An ops person halving admission for a few seconds mid-sale (SECKILL_LT_OPS=1)."""

    fixed_count = 1 if os.environ.get("SECKILL_LT_OPS") == "1" else 0
    weight = 0
    wait_time = constant(3600)

    @task
    def tighten(self) -> None:
        _wait_for_start(jitter_s=0.0)
        gevent.sleep(2)
        self.client.put(
            "/admin/v1/flags/admission.factor",
            json={"value": 0.5, "ttl_s": 5},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            name="PUT flag",
        )


class CrowdAtTheStartSecond(LoadTestShape):
    """Everyone arrives before the start (at spawn_rate, kept under 2,000/s), then waits for
    the start second inside their story; the run ends duration_s after the start."""

    def tick(self) -> tuple[int, float] | None:
        users = int(os.environ.get("SECKILL_LT_USERS", "100"))
        rate = float(os.environ.get("SECKILL_LT_SPAWN_RATE", "500"))
        duration = float(os.environ.get("SECKILL_LT_DURATION_S", "30"))
        if time.time() > START_AT + duration:
            return None
        return users, rate
