"""The hub's web dashboard: its static files over HTTP, and the page in a real browser.

The hub runs in the test process with protocol-speaking sites (``tests.hub.helpers.Site``)
that report hosts and instances, and log lines ingested into its log store. The browser
tests drive headless Chromium with selenium (Debian ``chromium`` and ``chromium-driver``):
missing, they skip, or fail under MESHORCH_REQUIRE_LAB=1 like the lab tests. Screenshots go
to the test's tmp dir and, when MESHORCH_SCREENSHOTS names a directory, there too.

Selenium blocks, so each browser scenario runs in a thread while the event loop serves
the hub; the scenario changes the fleet through ``World.on_hub``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from central_hub import Hub
from central_hub.dashboard import ASSET_DIR, ASSETS, add_dashboard
from central_hub.logstore import LogRecord
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import Operator, Site, healthy, spec_text
from tests.labutil import LAB_REQUIRED

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

T = TypeVar("T")
WAIT_S = 15.0
NASTY_LINE = "<img src=x onerror=\"document.title='pwned'\"> not markup"


# -- the hub, with the dashboard wired in -------------------------------------------------


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with Hub(hub_config(tmp_path / "hub", gossip=False)) as running:
        yield running


async def raw_get(hub: Hub, target: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``target`` exactly as written (clients normalise ``..`` away before sending)."""
    host, port = hub.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


# -- plain HTTP ------------------------------------------------------------------------------


async def test_static_files_are_served_with_their_types(
    hub: Hub, session: aiohttp.ClientSession
) -> None:
    expected = {
        "/dashboard/": ("text/html", b'<script src="app.js"'),
        "/dashboard/index.html": ("text/html", b"<title>meshorch hub</title>"),
        "/dashboard/app.js": ("text/javascript", b'"use strict"'),
        "/dashboard/style.css": ("text/css", b".tile.health-degraded"),
    }
    for path, (content_type, snippet) in expected.items():
        async with session.get(hub.url + path) as resp:
            body = await resp.read()
            assert resp.status == 200, path
            assert resp.content_type == content_type, path
            assert resp.charset == "utf-8"
            assert snippet in body, path
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/", "/dashboard"):
        async with session.get(hub.url + path, allow_redirects=False) as resp:
            assert (resp.status, resp.headers["Location"]) == (302, "/dashboard/"), path
    # The API is untouched and still answers JSON.
    async with session.get(hub.url + "/v1/fleet") as resp:
        assert resp.status == 200 and (await resp.json())["fleet"] == hub.fleet


async def test_nothing_but_the_assets_is_reachable(hub: Hub) -> None:
    for target in (
        "/dashboard/../service.py",
        "/dashboard/../../pyproject.toml",
        "/dashboard/%2e%2e/service.py",
        "/dashboard/..%2fservice.py",
        "/dashboard/%2e%2e%2fdashboard.py",
        "/dashboard//etc/passwd",
        "/dashboard/dashboard.py",
        "/dashboard/../dashboard.py",
        "/dashboard/missing.js",
        "/dashboard/app.js/",
        "/dashboard/APP.JS",
        "/dashboard/.%2e/api.py",
    ):
        status, _, body = await raw_get(hub, target)
        assert status in (400, 404), (target, status)
        assert b"import " not in body and b"root:" not in body, target
    status, _, body = await raw_get(hub, "/dashboard/missing.js")
    assert status == 404 and b"no file 'missing.js'" in body


def test_assets_are_self_contained_and_registration_is_idempotent() -> None:
    for name in ASSETS:
        # No CDN, no remote fonts: everything the page loads comes from the hub. (The SVG
        # namespace is a name the sparklines are created in, never fetched.)
        text = (ASSET_DIR / name).read_text().replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text, name
    app = web.Application()
    add_dashboard(app)
    add_dashboard(app)  # a second call (the hub wired it, a test wires it again) is harmless
    paths = sorted(r.canonical for r in app.router.resources())
    assert paths == ["/", "/dashboard", "/dashboard/{name}"]


# -- the browser -----------------------------------------------------------------------------


def require_browser() -> tuple[str, str]:
    """Chromium and its driver; skip (fail under MESHORCH_REQUIRE_LAB=1) when missing."""
    problems: list[str] = []
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None:
        problems.append("chromium not found on PATH (Debian package chromium)")
    if driver is None:
        problems.append("chromedriver not found on PATH (Debian package chromium-driver)")
    if importlib.util.find_spec("selenium") is None:
        problems.append("Python package selenium missing (pip install -e '.[test]')")
    if chromium is not None and driver is not None and not problems:
        return chromium, driver
    message = "browser test prerequisites missing: " + "; ".join(problems)
    if LAB_REQUIRED:
        pytest.fail(message + " (MESHORCH_REQUIRE_LAB=1)", pytrace=False)
    pytest.skip(message)


def test_missing_browser_skips_or_fails_under_require_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "LAB_REQUIRED", False)
    with pytest.raises(pytest.skip.Exception, match="chromium not found"):
        require_browser()
    monkeypatch.setattr(sys.modules[__name__], "LAB_REQUIRED", True)
    with pytest.raises(pytest.fail.Exception, match="MESHORCH_REQUIRE_LAB=1"):
        require_browser()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, chromedriver = require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # the system's: selenium downloads nothing
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class World:
    hub: Hub
    admin: Operator
    sites: dict[str, Site]
    loop: asyncio.AbstractEventLoop
    shots: list[Path]
    shot_dir: Path

    def on_hub(self, work: Awaitable[T]) -> T:
        """Run a coroutine on the hub's loop from the browser thread."""

        async def run() -> T:
            return await work

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT_S)

    def shot(self, driver: WebDriver, name: str, css: str | None = None) -> None:
        """A screenshot of the window, or of the element ``css`` only."""
        from selenium.webdriver.common.by import By

        path = self.shot_dir / f"{name}.png"
        if css is None:
            assert driver.save_screenshot(str(path)), name
        else:
            assert driver.find_element(By.CSS_SELECTOR, css).screenshot(str(path)), name
        self.shots.append(path)
        extra = os.environ.get("MESHORCH_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)


def instance(app: str, iid: str, *, state: str = "running", ready: bool = True,
             restarts: int = 0) -> dict[str, Any]:  # fmt: skip
    return {"app": app, "instance_id": iid, "service": "web", "version": "1.0",
            "state": state, "ready": ready, "restarts": restarts}  # fmt: skip


def host(host_id: str, *instances: dict[str, Any], alive: bool = True,
         use: tuple[float, float, float] = (0.4, 35.0, 42.0)) -> dict[str, Any]:  # fmt: skip
    load1, memory, disk = use
    return {"host_id": host_id, "alive": alive, "instances": list(instances),
            "agent_version": "0.9.0", "protocol": 2,
            "resources": {"load1": load1, "cpu_count": 2, "memory_used_pct": memory,
                          "disk_used_pct": disk, "at": time.time()}}  # fmt: skip


def seed_trends(hub: Hub, site_id: str, now: float, shape: float, restarted: int) -> None:
    """An hour of samples before now, as the hub would have kept them from the site's
    reports (the ring takes one per 30 s: a test cannot wait an hour)."""
    book = hub.parts.trends
    for n in range(119, 0, -1):
        wave = math.sin(n / 9 + shape)
        restarts = restarted if n < 40 else 0  # restarts some 20 minutes ago
        use = (0.6 + 0.4 * wave, 40 + 12 * wave + shape, 40 + n / 60 * shape)
        report = {"hosts": [host("h1", instance("web", "x", restarts=restarts), use=use)]}
        assert book.record(site_id, report, now - 30 * n)


def failed(version: str) -> dict[str, Any]:
    return {"version": version, "desired": 1, "ready": 0, "state": "failed",
            "message": "web exited 3 times"}  # fmt: skip


@pytest.fixture
async def world(hub: Hub, admin: Operator, session: aiohttp.ClientSession, tmp_path: Path) -> World:
    """Four sites: eu-1 healthy (two hosts), eu-2 degraded (a host down, web failed, a
    rejected delta), us-1 healthy, ap-1 registered but never reported; ``web`` rolled out to
    region eu; log lines of web at eu-1."""
    sites: dict[str, Site] = {}
    for site_id, region in (("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us"), ("ap-1", "ap")):
        site = Site(session, hub.url, site_id, hub.fleet, hub.root_key)
        body = {"id": site_id, "labels": {"region": region, "tier": "store"},
                "public_key": site.public_key}  # fmt: skip
        await admin.ok("POST", "/v1/sites", body, 201)
        sites[site_id] = site
    placement = {"match": {"region": "eu"}, "max_parallel": 1}
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "placement": placement}, 202)
    now = time.time()
    for site in sites.values():
        await site.sync()
    for shape, (site_id, restarted) in enumerate((("eu-1", 2), ("eu-2", 2), ("us-1", 0))):
        seed_trends(hub, site_id, now, float(shape), restarted)
    reports = {
        "eu-1": ({"web": healthy("1.0")},
                 [host("h1", instance("web", "web-1a", restarts=2)),
                  host("h2", instance("web", "web-1b"))], []),
        "eu-2": ({"web": failed("1.0")},
                 [host("h1", instance("web", "web-2a", state="exited", ready=False,
                                      restarts=3), use=(1.9, 88.0, 71.0)),
                  host("h2", alive=False)],
                 [{"reason": "expired", "message": "delta 1 expired in transit", "version": 1,
                   "at": now - 30}]),
        "us-1": ({}, [host("h1")], []),
    }  # fmt: skip
    for site_id, (apps, hosts, rejections) in reports.items():
        status, answer = await sites[site_id].report(apps, hosts=hosts, rejections=rejections)
        assert status == 200, answer
    lines = [
        (6, "h1", "GET /checkout 200 in 12 ms"),
        (3, "h1", "payment failed: card declined id=77f3"),
        (6, "h1", NASTY_LINE),
        (6, "h2", "only on the second host"),
    ]
    records = [
        LogRecord(seq, now - 10 + seq, level, where, text.encode())
        for seq, (level, where, text) in enumerate(lines, 1)
    ]
    await asyncio.to_thread(hub.logs.store.ingest, "eu-1", "default/web/logs", records)
    shot_dir = tmp_path / "screenshots"
    shot_dir.mkdir()
    return World(hub, admin, sites, asyncio.get_running_loop(), [], shot_dir)


# Helpers of the browser thread (plain selenium calls).


def until(driver: WebDriver, what: str, check: Callable[[WebDriver], T]) -> T:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, 0.05, (StaleElementReferenceException,)).until(
            lambda d: check(d) or None  # type: ignore[return-value]
        )
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}") from None


def texts(driver: WebDriver, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def visible(driver: WebDriver, css: str) -> bool:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return bool(found) and found[0].is_displayed()


def site_rows(driver: WebDriver) -> list[str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#sites tbody tr")
    return [r.get_attribute("data-site") or "" for r in rows]


def row_cells(driver: WebDriver, site: str) -> list[str]:
    return texts(driver, f'#sites tr[data-site="{site}"] td')


def click(driver: WebDriver, css: str, text: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    def found(d: WebDriver) -> Any:
        for element in d.find_elements(By.CSS_SELECTOR, css):
            if text is None or element.text == text:
                return element
        return None

    until(driver, f"{css} {text or ''}", found).click()


def open_dashboard(driver: WebDriver, hub: Hub) -> None:
    driver.get(hub.url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(hub.url + "/dashboard/")
    until(driver, "the login box", lambda d: visible(d, "#token"))


def log_in(driver: WebDriver, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "login-button").click()


def type_filter(driver: WebDriver, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "filter")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    if value:
        box.send_keys(value)


def script_errors(driver: WebDriver) -> list[str]:
    """Errors the page logged, beyond the failed requests it expects (404, 401)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[attr-defined]
    return [
        str(e["message"])
        for e in entries
        if e.get("level") == "SEVERE" and "Failed to load resource" not in str(e["message"])
    ]


# Scenarios.


def requests_by_route(world: World) -> dict[str, float]:
    """The hub's own count of answered requests per route (its /metrics latency histogram)."""

    async def scrape() -> str:
        async with world.admin.session.get(world.hub.url + "/metrics") as response:
            assert response.status == 200
            return await response.text()

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(world.on_hub(scrape())):
        for sample in family.samples:
            if sample.name == "meshorch_hub_api_request_seconds_count":
                route = sample.labels["route"]
                found[route] = found.get(route, 0.0) + sample.value
    return found


def fleet_to_logs(driver: WebDriver, world: World) -> None:
    hub = world.hub
    before = requests_by_route(world)
    open_dashboard(driver, hub)
    world.shot(driver, "01-login")
    log_in(driver, admin_token(hub))

    until(driver, "four sites", lambda d: len(site_rows(d)) == 4)
    assert site_rows(driver) == ["eu-2", "ap-1", "eu-1", "us-1"]  # unhealthy first, then by id
    until(driver, "site counts", lambda d: row_cells(d, "eu-1")[3] == "2/2")
    eu1, eu2, ap1 = row_cells(driver, "eu-1"), row_cells(driver, "eu-2"), row_cells(driver, "ap-1")
    # Hosts up, apps healthy, instances ready: the counts of GET /v1/sites.
    assert eu1[2:6] == ["healthy", "2/2", "1/1", "2/2"] and "region=eu" in eu1[1]
    assert eu2[2:6] == ["degraded", "1/2", "0/1", "0/1"]
    assert row_cells(driver, "us-1")[3:6] == ["1/1", "0/0", "0/0"]
    # Registered before its agents started: waiting, not offline.
    assert ap1[2:7] == ["awaiting first report", "—", "—", "—", "never"]
    assert eu1[7] == "0.9.0"
    assert "s ago" in eu1[6]
    groups = {g: texts(driver, f'#map .group[data-group="{g}"] .tile') for g in ("eu", "us", "ap")}
    assert groups == {"eu": ["eu-2", "eu-1"], "us": ["us-1"], "ap": ["ap-1"]}
    until(driver, "the alerts panel", lambda d: visible(d, "#alerts"))
    assert not visible(driver, "#login")
    # Sparklines of the last hour for every site that reported (the README's screenshot).
    sparks = '#sites .sparks[data-trends="eu-1"] svg.spark'
    until(driver, "eu-1's sparklines", lambda d: len(texts(d, sparks)) == 4)
    assert texts(driver, '#sites [data-trends="ap-1"]') == ["no reports yet"]
    calm = driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#sites .sparks')].map(e => "
        "[e.dataset.trends, e.querySelector('svg.spark-restarts').classList.contains('calm')]))"
    )
    assert calm == {"eu-1": False, "eu-2": False, "us-1": True}  # red only where it restarted
    world.shot(driver, "02-fleet")
    world.shot(driver, "dashboard-fleet", "#main")  # docs/dashboard-fleet.png

    type_filter(driver, "region=us")
    until(driver, "the filter", lambda d: site_rows(d) == ["us-1"])
    type_filter(driver, "")
    until(driver, "the filter cleared", lambda d: len(site_rows(d)) == 4)

    # Auto-refresh: us-1 loses a host; the table shows it without a reload.
    us1 = world.sites["us-1"]
    world.on_hub(us1.report({}, hosts=[host("h1"), host("h2", alive=False)]))
    until(driver, "us-1 degraded", lambda d: row_cells(d, "us-1")[2:4] == ["degraded", "1/2"])
    # The fleet view and its refreshes asked for the list only, never for a site's detail.
    seen = requests_by_route(world)
    list_route, detail_route = "/v1/sites", "/v1/sites/{id}"
    assert seen.get(detail_route, 0) == before.get(detail_route, 0)
    assert seen[list_route] - before.get(list_route, 0) >= 3  # login, first load, a refresh

    click(driver, "#sites a.site-link", "eu-1")
    until(driver, "eu-1's instances", lambda d: len(texts(d, "#instances tbody tr")) == 2)
    assert requests_by_route(world)[detail_route] > seen.get(detail_route, 0)  # drilled in
    until(driver, "eu-1's events", lambda d: "GET /checkout" in " ".join(texts(d, "#logs td")))
    assert re.fullmatch(
        r"h1: alive( \(agent 0\.9\.0\))? · h2: alive.*", texts(driver, "#host-summary")[0]
    )
    world.shot(driver, "03-site")

    click(driver, "#site-apps a.app-link", "web")
    until(driver, "web's lines", lambda d: "card declined id=77f3" in " ".join(texts(d, "#logs")))
    lines = texts(driver, "#logs td.log-text")
    assert NASTY_LINE in lines  # shown as text, never run
    assert driver.title == "meshorch hub"
    assert "only on the second host" in lines
    world.shot(driver, "04-app-at-site")

    click(driver, "#instances a.instance-link", "web-1a")
    until(driver, "the instance", lambda d: "restarts\n2" in " ".join(texts(d, "#instance-facts")))
    until(driver, "the host's lines", lambda d: "payment failed" in " ".join(texts(d, "#logs")))
    lines = texts(driver, "#logs td.log-text")
    assert "payment failed: card declined id=77f3" in lines
    assert "only on the second host" not in lines  # web-1a runs on h1
    world.shot(driver, "05-instance-logs")

    driver.get(hub.url + "/dashboard/#/site/eu-2")
    until(driver, "eu-2's rejection", lambda d: "expired" in " ".join(texts(d, "#rejections")))
    assert "delta 1 expired in transit" in " ".join(texts(driver, "#rejections td"))
    world.shot(driver, "06-degraded-site")

    click(driver, "#nav-apps")
    until(driver, "the rollouts", lambda d: texts(d, '#apps tr[data-app="web"] td a') == ["web"])
    # The list: a bar per wave (eu-1's full and green, eu-2's full and red).
    until(
        driver,
        "web's wave bars",
        lambda d: len(texts(d, '#apps tr[data-app="web"] .wave-bar')) == 2,
    )
    waves = driver.execute_script(
        "return [...document.querySelectorAll('#apps tr[data-app=\"web\"] .wave-bar')].map(b => "
        "[b.title, b.firstChild.style.width, b.firstChild.classList.contains('failed')])"
    )
    assert waves == [  # waves in site id order (central_hub/placement.py)
        ["wave 1: 1/1 healthy", "100%", False],
        ["wave 2: 0/1 healthy, 1 failed", "100%", True],
    ], waves
    click(driver, "#apps a.app-link", "web")
    until(driver, "web's waves", lambda d: len(texts(d, "#waves tbody tr")) == 2)
    assert {"eu-1", "eu-2"} == {c[0] for c in (r.split(":") for r in texts(driver, ".wave-site"))}
    # A progress bar per wave: eu-1's wave is done, eu-2's failed.
    bars = {
        texts(driver, f'#waves tr[data-wave="{n}"] .wave-site')[0].split(":")[0]: texts(
            driver, f'#waves tr[data-wave="{n}"] .progress'
        )[0]
        for n in (1, 2)
    }
    bars = {site: " ".join(bar.split()) for site, bar in bars.items()}  # flex items: lines
    assert bars == {"eu-1": "1/1", "eu-2": "0/1 (1 failed)"}, bars
    fills = driver.execute_script(
        "return [...document.querySelectorAll('#waves .progress .fill')].map(e => e.style.width)"
    )
    assert sorted(fills) == ["0%", "100%"]
    world.shot(driver, "07-rollout")

    # A page of something that does not exist says so with the hub's message.
    driver.get(hub.url + "/dashboard/#/site/gone-site")
    until(driver, "the banner", lambda d: visible(d, "#banner"))
    assert "not_found: no site 'gone-site'" in texts(driver, "#banner")[0]
    assert script_errors(driver) == []


async def test_fleet_drill_down_to_instance_logs(browser: WebDriver, world: World) -> None:
    started = time.monotonic()
    await asyncio.to_thread(fleet_to_logs, browser, world)
    assert len(world.shots) == 8 and all(p.stat().st_size > 1000 for p in world.shots)
    print(f"browser scenario {time.monotonic() - started:.1f}s, screenshots in {world.shot_dir}")


def bad_tokens(driver: WebDriver, world: World, viewer: str, revoke: Callable[[], None]) -> None:
    open_dashboard(driver, world.hub)
    log_in(driver, "mht_nope_nope")
    until(driver, "the hub's refusal", lambda d: visible(d, "#login-error"))
    assert "unknown or revoked token" in texts(driver, "#login-error")[0]
    assert not visible(driver, "#main")
    world.shot(driver, "08-bad-token")

    log_in(driver, "not-a-token")
    until(driver, "the format refusal", lambda d: "mht_" in texts(d, "#login-error")[0])

    # A token revoked while the page is open sends the operator back to the login box.
    log_in(driver, viewer)
    until(driver, "the fleet", lambda d: len(site_rows(d)) == 4)
    assert not visible(driver, "#login")
    assert driver.execute_script("return sessionStorage.length") == 1
    revoke()
    until(driver, "back to login", lambda d: visible(d, "#login-error"))
    assert "unknown or revoked token" in texts(driver, "#login-error")[0]
    assert not visible(driver, "#main")
    assert driver.execute_script("return sessionStorage.length") == 0
    world.shot(driver, "09-token-revoked")


async def test_bad_token_shows_the_hubs_message(browser: WebDriver, world: World) -> None:
    created = await world.admin.ok("POST", "/v1/tokens", {"role": "viewer"}, 201)

    def revoke() -> None:
        world.on_hub(world.admin.ok("DELETE", f"/v1/tokens/{created['id']}"))

    await asyncio.to_thread(bad_tokens, browser, world, created["token"], revoke)


# Alerts come from the hub itself: ap-1 has never reported (site_offline, awaiting its first
# report), eu-2 runs a degraded app (app_unhealthy).

OFFLINE = "site_offline:ap-1"


def acknowledge(driver: WebDriver, world: World) -> None:
    open_dashboard(driver, world.hub)
    log_in(driver, admin_token(world.hub))
    row = f'#alerts tr[data-alert="{OFFLINE}"]'
    until(driver, "the alerts", lambda d: bool(texts(d, row)))
    assert "ap-1 is awaiting its first report" in texts(driver, row)[0]
    world.shot(driver, "10-alerts")
    click(driver, f"{row} button.ack")
    until(driver, "acknowledged", lambda d: "acknowledged" in texts(d, row)[0])


async def test_alerts_are_shown_and_acknowledged(browser: WebDriver, world: World) -> None:
    await asyncio.to_thread(acknowledge, browser, world)
    alert = world.hub.alerts.active[OFFLINE]
    assert alert.acknowledged_by is not None
    assert any(a.startswith("app_unhealthy:eu-2:") for a in world.hub.alerts.active)


def pending_panel(driver: WebDriver, world: World, tenant_token: str) -> None:
    # eu-1 applied everything and reported web 1.0; then, unseen by it, web 2.0 for eu and a
    # lock-down of eu-1: its page says what it will do when it next applies them.
    placement = {"match": {"region": "eu"}, "max_parallel": 1}
    body = {"spec": spec_text(version="2.0"), "placement": placement}
    world.on_hub(world.admin.ok("POST", "/v1/apps", body, 202))
    world.on_hub(world.admin.ok("POST", "/v1/sites/eu-1/lockdown", {}))
    world.on_hub(world.admin.ok("POST", "/v1/sites/eu-1/hold"))
    head = world.hub.head.version
    open_dashboard(driver, world.hub)
    log_in(driver, world.admin.token)
    driver.get(world.hub.url + "/dashboard/#/site/eu-1")
    until(driver, "the pending changes", lambda d: len(texts(d, "#pending tbody tr")) == 2)
    rows = texts(driver, "#pending tbody tr")
    assert rows[0] == f"app web (default) upgraded 1.0 → 2.0 {head - 1}", rows
    assert rows[1] == f"lock-down lock down {head}", rows
    summary = texts(driver, "#pending-summary")[0]
    applied = world.sites["eu-1"].trust.version
    assert summary.startswith(
        f"applied {applied} of {head}: {head - applied} delta(s) pending, 2 for this site; "
        "as of its report of "
    ), summary
    assert "HELD since" in summary and "meshorch site release" in summary
    world.shot(driver, "10-pending")
    # A tenant's token does not see the fleet's log: the panel says so, the page stays.
    open_dashboard(driver, world.hub)
    log_in(driver, tenant_token)
    driver.get(world.hub.url + "/dashboard/#/site/eu-1")
    until(driver, "the refusal", lambda d: "fleet-wide" in "".join(texts(d, "#pending-summary")))


async def test_a_sites_pending_changes_are_shown(browser: WebDriver, world: World) -> None:
    await world.admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    made = await world.admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "blue"}, 201)
    await asyncio.to_thread(pending_panel, browser, world, made["token"])


def alert_history(driver: WebDriver, world: World) -> None:
    open_dashboard(driver, world.hub)
    log_in(driver, admin_token(world.hub))
    unhealthy = "app_unhealthy:eu-2:web"
    until(
        driver,
        "eu-2's alert",
        lambda d: bool(texts(d, f'#alerts-table tr[data-alert="{unhealthy}"]')),
    )
    assert texts(driver, "#alerts-title") == ["Alerts (2 active)"]
    # eu-2's app recovers: its alert clears and leaves the active list for the history.
    eu2 = world.sites["eu-2"]
    world.on_hub(eu2.report({"web": healthy("1.0")}, hosts=[host("h1"), host("h2")]))
    until(
        driver,
        "the alert cleared",
        lambda d: not texts(d, f'#alerts-table tr[data-alert="{unhealthy}"]'),
    )
    assert texts(driver, "#alerts-title") == ["Alerts (1 active)"]
    active = driver.execute_script(
        "return [...document.querySelectorAll('#alerts-table tbody tr')].map(r => r.dataset.alert)"
    )
    assert active == [OFFLINE]
    assert (
        "ap-1 is awaiting its first report"
        in texts(driver, f'#alerts-table tr[data-alert="{OFFLINE}"]')[0]
    )
    # (Also the site_offline alerts of sites registered before they first reported, if
    # the hub evaluated them in between: cleared, so never in the active list.)
    [summary] = texts(driver, "#alerts-history summary")
    assert re.fullmatch(r"History: \d+ cleared", summary), summary
    assert not visible(driver, "#alerts-cleared")  # folded until asked for
    click(driver, "#alerts-history summary")
    cleared = len(texts(driver, "#alerts-cleared tbody tr"))
    assert summary == f"History: {cleared} cleared"
    row = texts(driver, f'#alerts-cleared tr[data-cleared="{unhealthy}"] td')
    assert row[0] == "app_unhealthy" and row[1] == "eu-2" and "failed" in row[2]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", row[3]), row
    assert row[4].endswith("s ago"), row
    # The history stays open across refreshes.
    shown = texts(driver, "#status")[0]
    until(driver, "a refresh", lambda d: texts(d, "#status")[0] not in (shown, "refresh failed"))
    assert visible(driver, "#alerts-cleared")
    world.shot(driver, "11-alert-history")
    assert script_errors(driver) == []


async def test_the_alerts_panel_lists_active_alerts_and_a_history(
    browser: WebDriver, world: World
) -> None:
    await asyncio.to_thread(alert_history, browser, world)


def site_trends(driver: WebDriver, world: World, tenant_token: str) -> None:
    open_dashboard(driver, world.hub)
    log_in(driver, admin_token(world.hub))
    driver.get(world.hub.url + "/dashboard/#/site/eu-2")
    until(driver, "eu-2's trends", lambda d: len(texts(d, "#trends .trend")) == 4)
    values = {
        kind: texts(driver, f'#trends .trend[data-kind="{kind}"] .trend-value')[0]
        for kind in ("cpu", "memory", "disk", "restarts")
    }
    # Its last report: h1 at load 1.9 on 2 cores, memory 88 %, disk 71 %; three restarts
    # now: the counter rose 0 -> 2 (seeded) -> 3, +3 within the hour.
    assert values["cpu"].startswith("95%"), values
    assert values["memory"] == "88% · peak 88%", values
    assert values["disk"] == "71% · peak 71%", values
    assert values["restarts"] == "+3 in 60 min", values
    points = driver.execute_script(
        "return [...document.querySelectorAll('#trends svg.spark')].map(e => "
        "[e.dataset.points, e.querySelectorAll('polyline').length, "
        "e.querySelector('title').textContent])"
    )
    assert [p[0] for p in points] == ["120"] * 4 and all(p[1] == 1 for p in points), points
    # Time on the x axis: an hour of samples spans the width, the newest at the right edge.
    xs = driver.execute_script(
        "return document.querySelector('#trends svg.spark-memory polyline')"
        ".getAttribute('points').split(' ').map(p => parseFloat(p))"
    )
    assert xs[0] < 5 and xs[-1] == 220 and xs == sorted(xs), xs
    assert points[1][2] == "memory: 88% now, peak 88%"
    assert "120 sample(s), one per 30 s at most" in texts(driver, "#trends-summary")[0]
    world.shot(driver, "12-site-trends")
    # A tenant's token: the hub refuses trends, the page says so and keeps the rest.
    open_dashboard(driver, world.hub)
    log_in(driver, tenant_token)
    until(driver, "the fleet", lambda d: len(site_rows(d)) == 4)
    until(driver, "no sparklines", lambda d: row_cells(d, "eu-1")[9] == "—")
    driver.get(world.hub.url + "/dashboard/#/site/eu-1")
    until(driver, "the refusal", lambda d: "fleet-wide" in "".join(texts(d, "#trends-summary")))
    until(driver, "the rest of the page", lambda d: bool(texts(d, "#host-summary")))


async def test_site_trends_are_sparklines(browser: WebDriver, world: World) -> None:
    await world.admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    made = await world.admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "blue"}, 201)
    await asyncio.to_thread(site_trends, browser, world, made["token"])
