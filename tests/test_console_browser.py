"""The usage console in a real browser: headless Chromium driven by chromium-driver.

Data is the demo's own traffic (seeded, so every run sees the same events),
written straight to Postgres; every number the console shows is compared with
what the public API answers for the same query. With PGMETER_SCREENSHOTS=DIR the
main screens are saved there (that is how docs/console-*.png are made).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from pgmeter import demo
from pgmeter.config import Settings
from tests.support import events_sql, meter_env
from tests.support.app import AppServer
from tests.support.debian import installed
from tests.support.events_sql import Event

ADMIN = "console-admin-token-0123"
METERS = [
    {"slug": "api_calls", "eventType": "api.call", "aggregation": "COUNT",
     "groupBy": {"endpoint": "$.endpoint", "method": "$.method"}},
    {"slug": "api_latency", "eventType": "api.call", "aggregation": "SUM", "valueProperty": "$.response_time_ms",
     "groupBy": {"endpoint": "$.endpoint"}},
]
WAIT = 20  # seconds a page may take to show a result (generous: two shared cores)


def _browser_paths() -> tuple[str, str]:
    """Debian's chromium and chromium-driver, installed with apt-get when missing."""
    browser, driver = installed("chromium", "chromedriver", packages=("chromium", "chromium-driver"))
    return browser, driver


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[WebDriver]:
    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--lang=en-US"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    # TZ=UTC: the form's datetime-local fields are then UTC, like the API's answers.
    service = Service(executable_path=driver_path, env={**os.environ, "TZ": "UTC"})
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    driver = webdriver.Chrome(options=options, service=service)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def demo_events(count: int, seed: int) -> list[Event]:
    """The demo's traffic as stored rows: duplicates dropped, as the sink would."""
    rng, summary = random.Random(seed), demo.Summary()
    now = datetime.now(UTC)
    seen: dict[str, Event] = {}
    for _ in range(count):
        raw = demo.make_event(rng, now, timedelta(hours=6), summary)
        seen[raw["id"]] = Event(raw["subject"], datetime.fromisoformat(raw["time"]), raw["data"],
                                type=raw["type"], id=raw["id"], source=raw["source"])
    return list(seen.values())


@pytest.fixture
def server(settings: Settings) -> Iterator[AppServer]:
    settings.auth_tokens = {ADMIN: "default"}
    with AppServer(settings, {"api"}) as app:
        with app.client(headers={"Authorization": f"Bearer {ADMIN}"}) as client:
            for meter in METERS:
                assert client.post("/api/v1/meters", json=meter).status_code == 201
        # Plus one event a meter cannot read, among the newest: the Events screen must show its error.
        unreadable = Event("tpp-sandbox", datetime.now(UTC) - timedelta(seconds=30),
                           {"endpoint": "/aisp/accounts", "method": "GET", "response_time_ms": "n/a"}, type="api.call")
        events_sql.insert_committed(settings.postgres.url, [*demo_events(1500, seed=16), unreadable])
        meter_env.refresh(settings.postgres.url)
        yield app


def admin_api(server: AppServer) -> httpx.Client:
    return server.client(headers={"Authorization": f"Bearer {ADMIN}"})


def wait_for(driver: WebDriver, check: Callable[[WebDriver], Any]) -> Any:
    # The console re-renders a view as its data arrives: an element found a moment ago
    # may be gone when it is read. That is a moment of the page, not an answer; ask again.
    return WebDriverWait(driver, WAIT, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(check)


def use_token(driver: WebDriver, token: str) -> None:
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()


def screenshot(driver: WebDriver, name: str) -> None:
    target = os.environ.get("PGMETER_SCREENSHOTS")
    if target:
        driver.save_screenshot(str(Path(target) / f"console-{name}.png"))


def table_values(driver: WebDriver, table_id: str) -> list[float]:
    return [float(cell.get_attribute("data-value") or "nan")
            for cell in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} span.value")]


def query_done(driver: WebDriver) -> bool:
    return driver.find_element(By.ID, "q-results").get_attribute("data-state") == "done"


def test_console_query_chart_and_csv_match_the_api(server: AppServer, browser: WebDriver, downloads: Path) -> None:
    browser.get(server.base_url + "/#/meters")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    # Auth is on: without a token the page loads but shows no data.
    assert "401" in wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#view .error")).text
    use_token(browser, ADMIN)
    rows = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#meters-table tbody tr"))
    assert [row.find_element(By.TAG_NAME, "a").text for row in rows] == ["api_calls", "api_latency"]
    screenshot(browser, "meters")

    # Build a query: meter, range, hourly windows in UTC, grouped by endpoint, one method.
    browser.get(server.base_url + "/#/query?meter=api_latency")
    wait_for(browser, query_done)
    start = (datetime.now(UTC) - timedelta(hours=8)).replace(minute=0, second=0, microsecond=0)
    end = start + timedelta(hours=12)
    browser.execute_script("document.getElementById('q-from').value = arguments[0];"
                           "document.getElementById('q-to').value = arguments[1];"
                           "document.getElementById('q-tz').value = 'UTC';",
                           start.strftime("%Y-%m-%dT%H:%M"), end.strftime("%Y-%m-%dT%H:%M"))
    Select(browser.find_element(By.ID, "q-window")).select_by_value("HOUR")
    browser.find_element(By.CSS_SELECTOR, "input[name=groupBy][value=endpoint]").click()
    browser.find_element(By.ID, "q-subject").send_keys("tpp-moneywise,tpp-payfast")
    browser.execute_script("document.getElementById('q-results').dataset.state = ''")
    browser.find_element(By.ID, "q-run").click()
    wait_for(browser, query_done)

    params = [("from", start.isoformat().replace("+00:00", "Z")), ("to", end.isoformat().replace("+00:00", "Z")),
              ("windowSize", "HOUR"), ("windowTimeZone", "UTC"), ("groupBy", "endpoint"),
              ("subject", "tpp-moneywise"), ("subject", "tpp-payfast")]
    with admin_api(server) as api:
        expected = api.get("/api/v1/meters/api_latency/query", params=params).json()["data"]
        expected_csv = api.get("/api/v1/meters/api_latency/query", params=params,
                               headers={"Accept": "text/csv"}).text
    assert len(expected) > 20  # six hours of two TPPs on eight endpoints
    assert table_values(browser, "q-table") == [row["value"] for row in expected]
    total = float(browser.find_element(By.ID, "q-total").get_attribute("data-value") or "nan")
    assert total == sum(row["value"] for row in expected)
    # The chart draws the same numbers: one line per (subject, endpoint), points at window starts.
    drawn = browser.execute_script(
        "const chart = Chart.getChart(document.getElementById('q-chart'));"
        "return chart.data.datasets.map((d) => d.data.filter((v) => v !== null)).flat();")
    assert sorted(drawn) == sorted(row["value"] for row in expected)
    series = {(row["subject"], row["groupBy"]["endpoint"]) for row in expected}
    assert browser.find_element(By.ID, "q-chart").get_attribute("data-series") == str(len(series))
    screenshot(browser, "query")

    # CSV download: the file is the API's CSV for the same query, byte for byte.
    browser.find_element(By.ID, "q-csv").click()
    csv_file = downloads / "api_latency.csv"
    wait_for(browser, lambda d: csv_file.exists() and csv_file.read_text() == expected_csv)

    # Subjects: every TPP with its total, as the API counts them.
    browser.get(server.base_url + "/#/subjects")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#s-table tbody tr"))
    shown = {row.find_elements(By.TAG_NAME, "td")[0].text: row.find_elements(By.TAG_NAME, "td")[1].text
             for row in browser.find_elements(By.CSS_SELECTOR, "#s-table tbody tr")}
    month_ago = browser.execute_script("return document.querySelector('#s-form [name=from]').value")
    with admin_api(server) as api:
        per_subject = api.get("/api/v1/meters/api_calls/query", params={
            "groupBy": "subject", "from": month_ago + ":00Z"}).json()["data"]
    assert shown == {row["subject"]: f"{row['value']:,}" for row in per_subject}
    assert set(shown) == set(demo.TPPS)
    screenshot(browser, "subjects")

    # Events: the raw list with the validation errors the API reports.
    browser.get(server.base_url + "/#/events")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#e-table tbody tr"))
    browser.find_element(By.CSS_SELECTOR, "#e-form [name=invalid]").click()
    browser.find_element(By.CSS_SELECTOR, "#e-form button[type=submit]").click()
    with admin_api(server) as api:
        listed = api.get("/api/v1/events", params={"limit": 100}).json()
    errors = [item["validationError"] for item in listed if "validationError" in item]
    assert errors and "n/a" in errors[0]
    wait_for(browser, lambda d: [cell.text for cell in d.find_elements(By.CSS_SELECTOR, "#e-table td .error")]
             == errors)
    screenshot(browser, "events")
    browser.find_element(By.CSS_SELECTOR, "#e-form [name=invalid]").click()
    browser.find_element(By.CSS_SELECTOR, "#e-form button[type=submit]").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#e-table tbody tr")) == 100)

    # The API reference renders offline from /api/v1/openapi.json.
    browser.get(server.base_url + "/#/api")
    wait_for(browser, lambda d: d.execute_script(
        "const doc = document.querySelector('rapi-doc');"
        "return doc && doc.shadowRoot && doc.shadowRoot.textContent.includes('/api/v1/portal/meters/{meterSlug}/query');"))
    # Offline: every file the console and RapiDoc loaded came from pgmeter itself (no fonts, no CDN).
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    foreign = [url for url in loaded if not url.startswith(server.base_url + "/")]
    assert loaded and not foreign, foreign
    if os.environ.get("PGMETER_SCREENSHOTS"):
        time.sleep(0.3)  # let it paint for the picture
    screenshot(browser, "api-reference")


def test_portal_view_sees_one_tpp_only(server: AppServer, browser: WebDriver) -> None:
    browser.get(server.base_url + "/#/portal")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    use_token(browser, ADMIN)
    # An operator creates a token for one TPP in the console and opens the console as that TPP.
    subject = wait_for(browser, lambda d: d.find_element(By.ID, "p-subject"))
    subject.send_keys("tpp-budgetly")
    browser.find_element(By.ID, "p-slugs").send_keys("api_calls")
    browser.find_element(By.ID, "p-create").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#p-table tbody tr"))
    screenshot(browser, "portal-tokens")
    token = browser.find_element(By.ID, "p-token").get_attribute("value")
    assert token and token.count(".") == 2
    browser.find_element(By.ID, "p-open").click()

    wait_for(browser, lambda d: d.find_element(By.ID, "identity").text == "TPP tpp-budgetly")
    wait_for(browser, query_done)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Usage of tpp-budgetly"
    assert not browser.find_element(By.ID, "nav").is_displayed()  # one screen only
    subjects = {cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#q-table tbody td:nth-child(3)")}
    assert subjects == {"tpp-budgetly"}
    form_from = browser.execute_script("return document.getElementById('q-from').value")
    portal = httpx.get(f"{server.base_url}/api/v1/portal/meters/api_calls/query",
                       params={"from": form_from + ":00Z", "windowSize": "HOUR",
                               "windowTimeZone": "UTC"}, headers={"Authorization": f"Bearer {token}"}).json()["data"]
    assert {row["subject"] for row in portal} == {"tpp-budgetly"}
    assert table_values(browser, "q-table") == [row["value"] for row in portal]
    screenshot(browser, "portal-view")
    # Any other screen is the same one view: the token opens nothing else.
    browser.get(server.base_url + "/#/events")
    wait_for(browser, query_done)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Usage of tpp-budgetly"
    assert httpx.get(f"{server.base_url}/api/v1/events",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 401
