"""The live progress page in a real headless Chromium (Debian's), driven by selenium through chromedriver.

Start a run from the page, watch its bar move as events arrive, see it end
COMPLETE; open a run's detail with its history, cost and failures. Skipped
when chromium is not installed, except in CI (CI=true), where it must run.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from haulage.devtools.api_server import ApiServer
from tests.conftest import API_MODULES, ROOT, WorkerProcess, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
DEV_TOKEN = "browser-token-0123456789abcdef"
MODULES = API_MODULES
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]  # fmt: skip

if not (CHROMIUM and CHROMEDRIVER):
    reason = "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test must run in CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only importable once we know the browser is there
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


@pytest.fixture(scope="module")
def server(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    env = {"HAULAGE_API_AUTH": "dev", "HAULAGE_API_DEV_TOKEN": DEV_TOKEN, "HAULAGE_API_DEV_USER": "browser",
           "HAULAGE_API_DEV_ADMIN": "false", "HAULAGE_MODULES": MODULES, "HAULAGE_API_EVENTS_MIN_INTERVAL": "0.1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    with ApiServer(tmp_path_factory.mktemp("browser-api") / "api.log", env, cwd=ROOT) as srv:
        yield srv


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # selenium manager must not phone home
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def shot(driver: Any, name: str) -> Path:
    """Save a screenshot; HAULAGE_SCREENSHOTS=dir keeps them after the run."""
    kept = os.environ.get("HAULAGE_SCREENSHOTS")
    folder = Path(kept) if kept else Path(driver.capabilities["chrome"]["userDataDir"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    # Bars glide to their width (a CSS transition): capture them where they land.
    wait_until(lambda: driver.execute_script("return document.getAnimations().length === 0"), timeout=5,
               what="the page's transitions to end")  # fmt: skip
    driver.save_screenshot(str(path))
    return path


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def sign_in_by_link(driver: Any, url: str) -> None:
    """Open the page with ``#token=`` as ``haulage dev`` does, and confirm the account it names (dev mode only)."""
    driver.get(f"{url}/#token={DEV_TOKEN}")
    wait_until(lambda: _alert(driver), timeout=15, what="the sign-in confirmation").accept()
    wait_until(lambda: driver.find_element(By.ID, "main").is_displayed(), timeout=15, what="the page to sign in")


def _alert(driver: Any) -> Any:
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return None


_BAR = """
const row = document.querySelector(`tr.run[data-run-id="${arguments[0]}"]`);
return row ? [Number(row.querySelector('.bar').dataset.percent || 0), row.dataset.status] : null;
"""


def bar_state(driver: Any, run_id: str) -> tuple[float, str] | None:
    """The row's percent and status, read in one script call so the pair is never torn by an update."""
    state = driver.execute_script(_BAR, run_id)
    return (float(state[0]), str(state[1])) if state else None


def test_a_run_started_on_the_page_moves_its_bar_and_ends_complete(server: ApiServer, api_worker: WorkerProcess,
                                                                    browser: Any) -> None:  # fmt: skip
    sign_in_by_link(browser, server.url)
    assert browser.find_element(By.ID, "who").text == "browser"
    assert not browser.find_element(By.ID, "all-label").is_displayed()  # "everyone's runs" is for admins
    assert "token=" not in browser.current_url  # the token left the address bar
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#workflow option")) > 1, timeout=10,
               what="the workflow list")  # fmt: skip
    Select(browser.find_element(By.ID, "workflow")).select_by_visible_text("t_api_slow")
    params = browser.find_element(By.ID, "params")
    params.clear()
    params.send_keys('{"ticks": 10, "sleep": 0.4}')
    browser.find_element(By.ID, "start").click()

    row = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.run[data-run-id]"), timeout=10,
                     what="the new run's row")[0]  # fmt: skip
    run_id = row.get_attribute("data-run-id")
    seen: list[tuple[float, float, str]] = []
    started = time.monotonic()
    mid_shot = False
    while time.monotonic() - started < 60:
        state = bar_state(browser, run_id)
        if state is not None:
            seen.append((time.monotonic() - started, *state))
            if not mid_shot and 30 <= state[0] < 100:
                shot(browser, "runs-moving")
                mid_shot = True
            if state[1] == "COMPLETE":
                break
        time.sleep(0.05)
    percents = [p for _, p, _ in seen]
    assert seen and seen[-1][2] == "COMPLETE", seen[-5:]
    assert percents == sorted(percents), percents  # never backwards
    moving = sorted({p for p in percents if 0 < p < 100})
    # The list is re-read every 10 s; several steps inside one run of about 4 s can only come from the stream.
    assert len(moving) >= 4, moving
    assert percents[-1] == 100
    row = browser.find_element(By.CSS_SELECTOR, f'tr.run[data-run-id="{run_id}"]')
    assert row.find_element(By.CSS_SELECTOR, ".status").text == "COMPLETE"
    assert row.find_element(By.CSS_SELECTOR, ".steps").text == "2/2"
    assert row.find_element(By.CSS_SELECTOR, ".cost").text == "$0.0100"
    shot(browser, "runs-complete")

    row.click()
    wait_until(lambda: browser.find_element(By.ID, "detail-view").is_displayed(), timeout=10, what="the detail view")
    wait_until(lambda: any("complete" in li.text for li in browser.find_elements(By.CSS_SELECTOR, "#d-history li")),
               timeout=10, what="the history")  # fmt: skip
    assert browser.find_element(By.ID, "d-status").text == "COMPLETE"
    assert browser.find_element(By.CSS_SELECTOR, "#d-costs td").text == "tick-model"
    assert '"ticks": 10' in browser.find_element(By.ID, "d-result").text
    shot(browser, "run-detail")
    assert console_errors(browser) == []


def test_the_detail_of_a_partly_failed_run_lists_its_failures(server: ApiServer, api_worker: WorkerProcess,
                                                              browser: Any) -> None:  # fmt: skip
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {DEV_TOKEN}"}) as http:
        r = http.post("/v1/workflows/t_api_fan/runs", json={"params": {"n": 5, "fail_on": [1, 4]}})
        run_id = r.json()["run_id"]
        wait_until(lambda: http.get(f"/v1/runs/{run_id}").json()["status"] == "COMPLETE", timeout=30, what="the run")
    sign_in_by_link(browser, server.url)
    browser.get(f"{server.url}/#run={run_id}")
    # Read the table in one script call: it is re-rendered when the results arrive.
    read = "return [...document.querySelectorAll('#d-failures tr')].map(r => [...r.cells].map(c => c.textContent))"
    cells = wait_until(lambda: browser.execute_script(read), timeout=10, what="the failures table")
    assert [c[:3] for c in cells] == [["0:square[1]", "x=1", '{"x":1}'], ["0:square[4]", "x=4", '{"x":4}']], cells
    assert all(c[3].startswith("ValueError: bad item") for c in cells)
    assert "complete, 2 of 5 items failed" in browser.find_element(By.ID, "d-message").text
    # One row per item, with its label and status (GET /v1/runs/{id}/steps).
    rows = "return [...document.querySelectorAll('#d-items tr')].map(r => [...r.cells].map(c => c.textContent))"
    items = wait_until(lambda: browser.execute_script(rows), timeout=10, what="the item rows")
    assert [(r[0], r[1], r[2]) for r in items] == [
        (str(i), f"x={i}", "FAILED" if i in (1, 4) else "COMPLETE") for i in range(5)], items  # fmt: skip
    shot(browser, "run-failures")
    assert console_errors(browser) == []


def test_sign_in_with_a_pasted_token_and_cancel_from_the_detail(server: ApiServer, api_worker: WorkerProcess,
                                                                 browser: Any) -> None:  # fmt: skip
    browser.get(server.url)
    wait_until(lambda: browser.find_element(By.ID, "signin").is_displayed(), timeout=15, what="the sign-in form")
    browser.find_element(By.ID, "token").send_keys("not-the-token-0123456789")
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait_until(lambda: "invalid token" in browser.find_element(By.ID, "signin-error").text, timeout=10,
               what="the refusal")  # fmt: skip
    assert not browser.find_element(By.ID, "main").is_displayed()
    browser.find_element(By.ID, "token").send_keys(DEV_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait_until(lambda: browser.find_element(By.ID, "main").is_displayed(), timeout=10, what="the page to sign in")

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {DEV_TOKEN}"}) as http:
        r = http.post("/v1/workflows/t_api_slow/runs", json={"params": {"ticks": 200, "sleep": 0.1}})
        run_id = r.json()["run_id"]
    browser.get(f"{server.url}/#run={run_id}")
    wait_until(lambda: float(browser.find_element(By.ID, "d-bar").get_attribute("data-percent") or 0) > 0,
               timeout=20, what="the bar to move")  # fmt: skip
    browser.find_element(By.ID, "d-cancel").click()
    wait_until(lambda: browser.find_element(By.ID, "d-status").text == "CANCELLED", timeout=15, what="the cancel")
    assert not browser.find_element(By.ID, "d-cancel").is_displayed()
    shot(browser, "run-cancelled")
    # The refused token's 401 is the only error the console may show.
    assert [e for e in console_errors(browser) if "401" not in e] == []
