"""The ops console in a real browser: Debian's headless Chromium, driven by Selenium, against a
real `seckill up` on a redis-server of the test's own (killed on purpose in the last test).

Nothing is downloaded at run time: the driver and the browser are the system's
(`make tools` installs chromium and chromium-driver), and Selenium Manager is kept offline.
Screenshots go to a temporary directory, or to SECKILL_SCREENSHOTS (e.g. docs/console) when set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from seckill import settings as settings_module
from seckill.auth import UserAuth
from seckill.embedded import EmbeddedRedis, free_port
from tests.helpers import activity_body, rfc3339

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
SETTINGS = settings_module.load(environ={})
ADMIN_TOKEN = SETTINGS.admin.token
WAIT_S = 30.0  # generous: the CI machine is busy; nothing here is a timing assertion

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="chromium and chromium-driver are missing: `make tools` installs them",
)


@dataclass
class Sale:
    url: str
    redis: EmbeddedRedis
    process: subprocess.Popen[str]


def _call(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _order(sale: Sale, activity_id: str, user: str, key: str) -> tuple[int, Any]:
    token = UserAuth(SETTINGS.jwt.secret).mint(user, 600)
    return _call(
        f"{sale.url}/api/v1/activities/{activity_id}/orders",
        "POST",
        {"quantity": 1},
        {"Authorization": f"Bearer {token}", "Idempotency-Key": key},
    )


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def sale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sale]:
    """`seckill up` (gateway, writer, sweeper; SQLite) on a redis-server this module owns."""
    redis = EmbeddedRedis(tmp_path_factory.mktemp("console-redis"), appendfsync="always")
    redis.start()
    cwd = tmp_path_factory.mktemp("console-up")
    process = subprocess.Popen(
        [sys.executable, "-m", "seckill", "up", "--port", "0"],
        env={**CLEAN_ENV, "SECKILL_REDIS_URL": redis.url},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=(cwd / "gateway.log").open("w"),
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("seckill serving on http://"), line
    try:
        yield Sale(line.split()[-1], redis, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        redis.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: a temporary directory unless SECKILL_SCREENSHOTS names one."""
    chosen = os.environ.get("SECKILL_SCREENSHOTS")
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module, the system's driver, Selenium Manager offline."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the test may run as root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1700",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _until(
    predicate: Callable[[], Any],
    what: str,
    within_s: float = WAIT_S,
    detail: Callable[[], str] | None = None,
) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        try:
            value = predicate()
        except Exception:  # an element between two renders: ask again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f" (the page shows: {detail()!r})" if detail is not None else ""
            raise AssertionError(f"not seen within {within_s:.0f} s: {what}{seen}")
        time.sleep(0.1)


def _text(driver: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, selector).text)


def _visible(driver: Any, selector: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(driver.find_element(By.CSS_SELECTOR, selector).is_displayed())


def _sign_in(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/admin/console")  # a fresh page: the previous token is gone with it
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    driver.find_element(By.ID, "signin-button").click()


def _signed_in(driver: Any, url: str) -> None:
    _sign_in(driver, url, ADMIN_TOKEN)
    _until(lambda: _visible(driver, "#console"), "the console after sign-in")
    assert not _visible(driver, "#signin")
    _until(lambda: _text(driver, "#status") == "live", "the live stream connected")


def test_a_wrong_token_is_refused(browser: Any, sale: Sale, shots: Path) -> None:
    """Invariant: a wrong token shows nothing of the sale and leaves no trace in the browser."""
    _sign_in(browser, sale.url, "not-the-admin-token")
    _until(lambda: "401" in _text(browser, "#signin-error"), "the refusal")
    assert not _visible(browser, "#console")
    assert "Token refused" in _text(browser, "#signin-error")
    stored = browser.execute_script(
        "return [localStorage.length, sessionStorage.length, document.cookie]"
    )
    assert stored == [0, 0, ""]
    assert "token" not in browser.current_url
    browser.save_screenshot(str(shots / "signin-refused.png"))


def test_sign_in_and_watch_a_live_sale_move(browser: Any, sale: Sale, shots: Path) -> None:
    """The activity's numbers and the requests per second move as orders arrive."""
    body = activity_body(id="console-live", title="Phone, live", stock=50, per_user_limit=1)
    assert _call(f"{sale.url}/admin/v1/activities", "POST", body, _admin())[0] == 201
    _signed_in(browser, sale.url)
    row = '#activities tr[data-activity="console-live"]'
    _until(lambda: _text(browser, f"{row} td.available") == "50", "the stock of 50")
    for n in range(6):
        assert _order(sale, "console-live", f"shopper{n}", f"k{n}")[0] == 202
    _until(lambda: _text(browser, f"{row} td.available") == "44", "available 44 after 6 orders")
    assert _text(browser, f"{row} td.reserved") == "6"
    _until(
        lambda: browser.find_elements(
            "css selector", '#outcomes tr[data-endpoint="order_create"][data-outcome="ok"]'
        ),
        "order_create ok in the requests per second",
    )
    # the writer stores them: nothing left to write and the report consistent
    _until(lambda: _text(browser, f"{row} td.pending") == "0", "pending writes back to 0")
    _until(lambda: _text(browser, f"{row} td.consistent") == "yes", "a consistent report")
    assert _text(browser, "#health-writer") == "alive"
    _until(lambda: _text(browser, f"{row} td.created") == "6", "6 orders created")
    # the rest of the sale: shoppers keep coming until it sells out, and beyond
    crowd = threading.Thread(target=_crowd, args=(sale, "console-live", 70), daemon=True)
    crowd.start()
    try:
        _until(lambda: _text(browser, f"{row} td.state") == "sold_out", "the sale sold out")
        assert _text(browser, f"{row} td.available") == "0"
        _until(
            lambda: browser.find_elements(
                "css selector",
                '#outcomes tr[data-endpoint="order_create"][data-outcome="sold_out"]',
            ),
            "sold_out answers in the requests per second",
        )
        browser.save_screenshot(str(shots / "live-sale.png"))
    finally:
        crowd.join(WAIT_S)
    _until(lambda: _text(browser, f"{row} td.paid") == "0", "the report after the crowd")
    assert _text(browser, f"{row} td.reserved") == "50"


def _crowd(sale: Sale, activity_id: str, shoppers: int) -> None:
    """Shoppers arriving over a few seconds (some after the sell-out), as the chart shows them."""
    for n in range(shoppers):
        _order(sale, activity_id, f"crowd{n}", f"c{n}")
        time.sleep(0.07)  # pacing the load so the chart has a shape, not a measurement


def test_the_sale_off_with_a_ttl_from_the_page_and_back(
    browser: Any, sale: Sale, shots: Path
) -> None:
    """seckill.enabled off for a TTL: orders get 503 degraded, then the flag returns by itself."""
    from selenium.webdriver.common.by import By

    body = activity_body(id="console-flags", stock=100, per_user_limit=5)
    assert _call(f"{sale.url}/admin/v1/activities", "POST", body, _admin())[0] == 201
    _signed_in(browser, sale.url)
    row = browser.find_element(By.CSS_SELECTOR, '#flags tr[data-flag="seckill.enabled"]')
    row.find_element(By.CSS_SELECTOR, "input.ttl").send_keys("10")
    row.find_element(By.CSS_SELECTOR, "button.off").click()
    _until(lambda: "true → false" in _text(browser, "#flag-message"), "the PUT's answer")
    status, answer = _order(sale, "console-flags", "shopper-degraded", "d1")
    assert status == 503, answer
    assert answer["error"]["code"] == "degraded"
    _until(lambda: _visible(browser, "#banner-degraded"), "the sale-degraded banner")
    assert "back at" in _text(browser, "#banner-degraded")
    _until(
        lambda: "false" in _text(browser, '#flags tr[data-flag="seckill.enabled"] td.value'),
        "the flag shown off",
    )
    _until(lambda: "admin-api" in _text(browser, "#audit tbody"), "the change in the audit trail")
    browser.save_screenshot(str(shots / "sale-degraded.png"))
    # the TTL runs out: the flag returns to true by itself, audited, and orders are taken again
    _until(lambda: not _visible(browser, "#banner-degraded"), "the banner gone after the TTL")
    _until(lambda: "ttl-expiry" in _text(browser, "#audit tbody"), "the revert in the audit")
    status, answer = _order(sale, "console-flags", "shopper-degraded", "d2")
    assert status == 202, answer


def test_a_bad_activity_is_refused_with_the_api_message(
    browser: Any, sale: Sale, shots: Path
) -> None:
    """The form shows the admin API's own error verbatim; a good definition is then saved."""
    from selenium.webdriver.common.by import By

    _signed_in(browser, sale.url)
    form = browser.find_element(By.ID, "activity-form")

    def fill(name: str, value: str) -> None:
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)

    fill("id", "console-made")
    fill("title", "Made on the console")
    fill("starts_at", rfc3339(3600))
    fill("ends_at", rfc3339(60))  # before the start
    browser.find_element(By.ID, "activity-save").click()
    _until(lambda: "invalid_request" in _text(browser, "#activity-message"), "the refusal")
    assert _text(browser, "#activity-message") == (
        "400 invalid_request: ends_at must be after starts_at"
    )
    assert _call(f"{sale.url}/admin/v1/activities/console-made", headers=_admin())[0] == 404
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'})",
        browser.find_element(By.ID, "activity-message"),
    )
    browser.save_screenshot(str(shots / "activity-refused.png"))
    fill("ends_at", rfc3339(7200))
    browser.find_element(By.ID, "activity-save").click()
    _until(
        lambda: "Saved console-made" in _text(browser, "#activity-message"),
        "the save",
        detail=lambda: _text(browser, "#activity-message"),
    )
    status, saved = _call(f"{sale.url}/admin/v1/activities/console-made", headers=_admin())
    assert status == 200 and saved["title"] == "Made on the console"

    # edit it from its row: the form is filled from GET /admin/v1/activities/{id}
    edit = '#activities tr[data-activity="console-made"] button.edit'
    _until(lambda: browser.find_elements(By.CSS_SELECTOR, edit), "the new activity's row")
    browser.find_element(By.CSS_SELECTOR, edit).click()
    _until(lambda: "Loaded console-made" in _text(browser, "#activity-message"), "the load")
    assert form.find_element(By.NAME, "stock").get_attribute("value") == "100"
    fill("stock", "250")
    browser.find_element(By.ID, "activity-save").click()
    _until(
        lambda: "stock 250" in _text(browser, "#activity-message"),
        "the edit saved",
        detail=lambda: _text(browser, "#activity-message"),
    )

    # a sale that has started cannot be replaced: the API's 409 is shown as it is
    started = activity_body(id="console-started", title="On sale")
    assert _call(f"{sale.url}/admin/v1/activities", "POST", started, _admin())[0] == 201
    live = '#activities tr[data-activity="console-started"] button.edit'
    _until(lambda: browser.find_elements(By.CSS_SELECTOR, live), "the started activity's row")
    browser.find_element(By.CSS_SELECTOR, live).click()
    _until(lambda: "Loaded console-started" in _text(browser, "#activity-message"), "the load")
    fill("title", "Renamed during the sale")
    browser.find_element(By.ID, "activity-save").click()
    _until(
        lambda: "409 conflict: " in _text(browser, "#activity-message"),
        "the conflict",
        detail=lambda: _text(browser, "#activity-message"),
    )
    status, kept = _call(f"{sale.url}/admin/v1/activities/console-started", headers=_admin())
    assert status == 200 and kept["title"] == "On sale"


def test_redis_killed_shows_redis_down_and_the_breaker_open(
    browser: Any, sale: Sale, shots: Path
) -> None:
    """Kill the sale's redis-server: the page says Redis is down and the breaker opens."""
    body = activity_body(id="console-outage", stock=10)
    assert _call(f"{sale.url}/admin/v1/activities", "POST", body, _admin())[0] == 201
    _signed_in(browser, sale.url)
    _until(
        lambda: _text(browser, '#activities tr[data-activity="console-outage"] td.available'),
        "the activity on the page",
    )
    process = sale.redis._process
    assert process is not None
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    _until(lambda: _visible(browser, "#banner-redis"), "the Redis-down banner")
    assert _text(browser, "#health-redis") == "down"
    # shoppers keep trying: each attempt fails closed (503) and the Redis breaker opens
    refused = [_order(sale, "console-outage", f"s{n}", f"o{n}")[0] for n in range(15)]
    assert set(refused) == {503}
    _until(lambda: _visible(browser, "#banner-breaker"), "the breaker banner")
    assert "redis open" in _text(browser, "#banner-breaker")
    assert _text(browser, '#breakers li[data-breaker="redis"] .breaker-state') == "open"
    browser.save_screenshot(str(shots / "redis-down.png"))
    # Redis back (same port, its AOF replayed): the page recovers by itself
    sale.redis.start()
    _until(lambda: not _visible(browser, "#banner-redis"), "the Redis banner gone")
    assert _text(browser, "#health-redis") == "up"


def _fake_gateway(port: int, ready: threading.Event, stop: threading.Event) -> None:
    """Admin endpoints of a gateway that has the fair-sale and risk work merged (stand-ins)."""
    import asyncio

    from aiohttp import web

    from seckill.web import console

    def authorized(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {ADMIN_TOKEN}":
            raise web.HTTPUnauthorized()

    async def flags(request: web.Request) -> web.Response:
        authorized(request)
        return web.json_response({"flags": {"seckill.enabled": True}})

    async def live(request: web.Request) -> web.StreamResponse:
        authorized(request)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        snapshot = {
            "at": rfc3339(0),
            "redis": {"up": True, "error": None},
            "sale": {"enabled": True},
            "flags": {"seckill.enabled": True},
            "flag_expiries": {},
            "breakers": [],
            "requests": {"per_second": 0, "by_outcome": {}, "by_endpoint": {}},
            "activities": [{"id": "fair-1", "title": "Lottery", "state": "upcoming"}],
            "activities_total": 1,
            "audit": [],
        }
        while not stop.is_set():
            await stream.write(b"data: " + json.dumps(snapshot).encode() + b"\n\n")
            await asyncio.sleep(1)
        return stream

    async def listing(request: web.Request) -> web.Response:
        authorized(request)
        return web.json_response({"count": 0, "activities": []})

    async def draw(request: web.Request) -> web.Response:
        authorized(request)
        return web.json_response(
            {
                "activity_id": "fair-1",
                "registrants": 1234,
                "drawn": False,
                "placed": None,
                "revealed": False,
                "commitment": "ab" * 32,
            }
        )

    async def hits(request: web.Request) -> web.Response:
        authorized(request)
        hit = {
            "rule": "device_accounts",
            "mode": "shadow",
            "activity_id": "fair-1",
            "subject": "device:5f0c9d2e",
            "at": rfc3339(0),
        }
        return web.json_response({"hits": [hit]})

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/admin/console", console.page)
        app.router.add_get(r"/admin/console/{name:[a-z]+\.(?:js|css)}", console.asset)
        app.router.add_get("/admin/v1/flags", flags)
        app.router.add_get("/admin/v1/live", live)
        app.router.add_get("/admin/v1/activities", listing)
        app.router.add_get("/admin/v1/activities/fair-1/draw", draw)
        app.router.add_get("/admin/v1/risk/hits", hits)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await runner.cleanup()

    asyncio.run(serve())


def test_the_queue_and_risk_panels_appear_once_their_endpoints_answer(
    browser: Any, sale: Sale
) -> None:
    """Each panel shows exactly when the gateway answers its endpoint; a risk hit appears."""
    from selenium.webdriver.common.by import By

    risk = _call(f"{sale.url}/admin/v1/risk/hits?limit=1", headers=_admin())[0]
    listed = _call(f"{sale.url}/admin/v1/activities", headers=_admin())[1]["activities"]
    draws = {
        a["id"]: _call(f"{sale.url}/admin/v1/activities/{a['id']}/draw", headers=_admin())[0]
        for a in listed
    }
    _signed_in(browser, sale.url)
    _until(lambda: _text(browser, "#health-redis") == "up", "a first snapshot")
    if risk == 200:  # risk control is in this gateway: a refusal shows as a hit
        denied = "console-denied"
        put = _call(
            f"{sale.url}/admin/v1/risk/deny/user/{denied}",
            "PUT",
            {"ttl_s": 600, "reason": "console test"},
            _admin(),
        )
        assert put[0] in (200, 201), put
        status, answer = _order(sale, listed[0]["id"], denied, "denied-1")
        assert status == 403 and answer["error"]["code"] == "risk_refused", answer
        _until(lambda: "deny_user" in _text(browser, "#risk tbody"), "the hit in the risk panel")
        assert _visible(browser, "#risk-panel")
        assert denied not in _text(browser, "#risk tbody")  # subjects are keyed hashes
    else:
        assert risk == 404
        assert not _visible(browser, "#risk-panel")
    if 200 in draws.values():  # a fair sale's queue: its row shows
        _until(lambda: _visible(browser, "#queue-panel"), "the queue panel")
        for activity_id, status in draws.items():
            rows = browser.find_elements(
                By.CSS_SELECTOR, f'#queue tr[data-activity="{activity_id}"]'
            )
            assert bool(rows) == (status == 200), activity_id
    else:
        assert not _visible(browser, "#queue-panel")

    # a gateway with both endpoints (stand-ins here) shows both panels
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=_fake_gateway, args=(port, ready, stop), daemon=True)
    server.start()
    try:
        assert ready.wait(WAIT_S)
        _signed_in(browser, f"http://127.0.0.1:{port}")
        _until(lambda: _visible(browser, "#risk-panel"), "the risk panel")
        assert "device_accounts" in _text(browser, "#risk tbody")
        _until(lambda: _visible(browser, "#queue-panel"), "the queue panel")
        assert "1,234" in _text(browser, '#queue tr[data-activity="fair-1"]')
    finally:
        stop.set()
        server.join(WAIT_S)
