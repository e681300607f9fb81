"""The dashboard in a real browser (Debian's headless chromium, driven by selenium through chromedriver): against
``mlmirror demo`` once its story is told, and against ``mlmirror serve`` (supervisor, workers, observing process)
with an admin token and a config reload. Set ``MLMIRROR_SCREENSHOTS=docs`` to refresh the screenshots in docs/."""

from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.ports import free_port, wait_for_port
from tests.support import REPO, http_get, mlmirror

pytestmark = [pytest.mark.process, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:  # .ci/run installs them (Debian: chromium, chromium-driver)
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PANELS = ("traffic", "latency", "shadows", "drift", "quality", "health")
CHARTS = ("served", "errors", "fallbacks", "latency", "agreement", "dropped", "drift", "lag")


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-gpu", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.execute_cdp_cmd(  # the viewport, so screenshots are 1280x800 whatever the window's frame takes
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        yield driver
    finally:
        driver.quit()


def output_lines(process: subprocess.Popen) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue[str], start: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line.startswith(start):
            return line
    raise AssertionError(f"no line starting {start!r} within {timeout}s")


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[str, list[str]]]:
    """``mlmirror demo`` whose story has been told (its dashboard lingering): (base URL, its first line)."""
    admin = free_port()
    process = mlmirror("demo", "--duration", "30s", "--rate", "50", "--listen", "127.0.0.1:0",
                       "--admin", f"127.0.0.1:{admin}", "--linger", "240s")  # fmt: skip
    try:
        lines = output_lines(process)
        first = wait_for_line(lines, "")
        wait_for_line(lines, "done: ")
        yield f"http://127.0.0.1:{admin}", [first]
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def status_of(base: str, token: str | None = None) -> dict:
    code, body = http_get(base + "/status", token=token)
    assert code == 200, body
    return json.loads(body)


def open_page(driver: webdriver.Chrome, url: str, updates: int = 2) -> None:
    driver.get(url)
    wait_updates(driver, updates)


def wait_updates(driver: webdriver.Chrome, at_least: int) -> None:
    WebDriverWait(driver, 60).until(
        lambda d: int(d.execute_script("return document.body.dataset.updates || 0")) >= at_least
    )


def console_errors(driver: webdriver.Chrome) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver: webdriver.Chrome, name: str, tmp: Path) -> Path:
    path = tmp / name
    driver.save_screenshot(str(path))
    folder = os.environ.get("MLMIRROR_SCREENSHOTS")
    if folder:
        shutil.copy(path, REPO / folder / name)
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_demo_dashboard_draws_every_panel_and_shows_what_status_says(browser, demo, tmp_path):
    base, (first,) = demo
    assert first.startswith(f"dashboard: {base}/")  # the page's address comes first
    open_page(browser, base + "/")
    for panel in PANELS:
        assert browser.find_element(By.ID, f"panel-{panel}").is_displayed()
    for chart in CHARTS:  # uPlot drew each chart: a canvas in each
        assert browser.find_elements(By.CSS_SELECTOR, f"#chart-{chart} canvas"), chart
    assert browser.execute_script("return document.body.dataset.route") == "iris"
    status = status_of(base)
    [iris] = [r for r in status["routes"] if r["name"] == "iris"]
    assert browser.find_element(By.ID, "route-calls").text == str(sum(iris["calls"].values()))
    assert int(browser.find_element(By.ID, "route-fallbacks").text) == sum(iris["fallbacks"].values()) > 0
    # the drift event: one of production's (version 1) windows flagged petal length, and the heatmap marks it
    flagged = [w for w in iris["drift"]["history"] if w["version"] == "1" and "input[2]" in w["drifted"]]
    assert flagged
    shown = browser.find_element(By.ID, "drifted-features").text
    for window in iris["drift"]["latest"]:
        drifted = ", ".join(window["drifted"]) or "none"
        assert f"version {window['version']} window {window['index']}: {drifted}" in shown
    drifted_cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap td.drifted")
    assert drifted_cells
    assert any("input[2]" in (cell.get_attribute("title") or "") for cell in drifted_cells)
    # the shadow's agreement, as /status has it
    [shadow] = iris["shadows"]
    row = browser.find_element(By.CSS_SELECTOR, "#shadow-table tr[data-shadow='candidate']")
    assert float(row.get_attribute("data-agreement")) == pytest.approx(shadow["window"]["agreement"])
    assert row.find_element(By.CLASS_NAME, "agreement").text == f"{100 * shadow['window']['agreement']:.1f}%"
    # health: the production circuit, as /status has it
    circuit = browser.find_element(By.CSS_SELECTOR, "#health-table tr[data-name='circuit production'] td:last-child")
    assert circuit.text.startswith(status["upstreams"]["production"]["circuit"]["state"])
    assert console_errors(browser) == []
    assert png_size(screenshot(browser, "dashboard.png", tmp_path)) == (1280, 800)
    browser.execute_script("document.getElementById('panel-drift').scrollIntoView()")
    assert png_size(screenshot(browser, "dashboard-drift.png", tmp_path)) == (1280, 800)
    # another route: the page switches
    browser.execute_script("const s = document.getElementById('route'); s.value = 'default';"
                           "s.dispatchEvent(new Event('change'))")  # fmt: skip
    assert browser.execute_script("return document.body.dataset.route") == "default"
    assert console_errors(browser) == []


SERVE_CONFIG = """\
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
admin_token_file: {token}
upstreams:
  production: {{address: 127.0.0.1:{production}, timeout: 1s}}
  candidate: {{address: 127.0.0.1:{candidate}, timeout: 1s}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    shadows: [{{upstream: candidate}}]
    compare: {{classification: argmax, output: probabilities}}
    promotion: {{window: 500, min_samples: 50, agreement: {agreement}}}
    drift: {{window: 100, capture: 100, bins: 10}}
"""


def test_the_dashboard_of_serve_needs_the_token_and_survives_a_reload(browser, tmp_path):
    token = tmp_path / "token"
    token.write_text("dash-s3cret\n")
    ports = {name: free_port() for name in ("listen", "admin", "production", "candidate")}
    models = [mlmirror("model-server", "--model", name, "--listen", f"127.0.0.1:{ports[name]}")
              for name in ("production", "candidate")]  # fmt: skip
    config = tmp_path / "mlmirror.yaml"
    config.write_text(SERVE_CONFIG.format(token=token, agreement=0.9, **ports))
    serve = None
    traffic = None
    try:
        for name in ("production", "candidate"):
            wait_for_port(ports[name])
        serve = mlmirror("serve", "--config", str(config), "--workers", "2")
        wait_for_port(ports["admin"], timeout=90)
        traffic = subprocess.Popen(
            [sys.executable, "-c", TRAFFIC, f"127.0.0.1:{ports['listen']}"], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        base = f"http://127.0.0.1:{ports['admin']}"
        assert http_get(base + "/")[0] == 401
        assert http_get(base + "/history")[0] == 401
        browser.get(base + "/")
        assert "needs its admin token" in browser.find_element(By.TAG_NAME, "body").text
        assert all("401" in e["message"] for e in console_errors(browser))  # that one, expected; the log is read
        open_page(browser, base + "/?token=dash-s3cret")
        assert "token" not in browser.current_url  # taken once, out of the address bar
        WebDriverWait(browser, 90).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#shadow-table tr[data-shadow='candidate']")
        )
        status = status_of(base, "dash-s3cret")
        assert len(status["workers"]) == 2
        assert "2 workers" in browser.find_element(By.ID, "summary").text
        observer = browser.find_element(By.CSS_SELECTOR, "#health-table tr[data-name='observer'] td:last-child")
        assert observer.text.startswith("up")
        for chart in CHARTS:
            assert browser.find_elements(By.CSS_SELECTOR, f"#chart-{chart} canvas"), chart
        # A reload with a new threshold: the page goes on updating and shows the new one.
        config.write_text(SERVE_CONFIG.format(token=token, agreement=0.5, **ports))
        assert http_get(base + "/reload", "POST", token="dash-s3cret")[0] == 200
        seen = int(browser.execute_script("return document.body.dataset.updates"))
        wait_updates(browser, seen + 2)
        WebDriverWait(browser, 30).until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, "#shadow-table tr[data-shadow='candidate'] td:nth-child(4)").text
                == "50.0%"
            )
        )
        reloads = browser.find_element(By.CSS_SELECTOR, "#health-table tr[data-name='config reloads'] td:last-child")
        assert "success 1" in reloads.text
        calls = sum(status_of(base, "dash-s3cret")["routes"][0]["calls"].values())
        WebDriverWait(browser, 30).until(lambda d: int(d.find_element(By.ID, "route-calls").text) >= calls > 0)
        assert console_errors(browser) == []
        assert png_size(screenshot(browser, "dashboard-serve.png", tmp_path)) == (1280, 800)
    finally:
        for process in [traffic, serve, *models]:
            if process is not None:
                stop(process)


TRAFFIC = """
import asyncio, sys
from mlmirror.demo.traffic import TrafficStats, run_traffic
async def main():
    await run_traffic(sys.argv[1], rate=40, stop=asyncio.Event(), stats=TrafficStats(), models=("iris",),
                      shifted=asyncio.Event())
asyncio.run(main())
"""
