"""The dashboard in a real browser: `streamlit run app.py` on 127.0.0.1, driven by Selenium in
headless Chromium (Debian's chromium and chromium-driver; `.ci/run` installs them). A screenshot
of each step is saved under test-artifacts/ (or $NPUSIM_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("NPUSIM_ARTIFACTS", ROOT / "test-artifacts"))

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("no Chromium here (apt-get install chromium chromium-driver; CI installs them)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"streamlit did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                "--disable-gpu"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _wait(driver, css: str, timeout: float = 30, count: int = 1):
    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, css)) >= count)
    return driver.find_elements(By.CSS_SELECTOR, css)


def _settled(driver, timeout: float = 30) -> None:
    """Wait until the app has finished its rerun: Streamlit shows its status widget ("Stop")
    shortly after a run starts, and removes it when the run ends."""
    try:
        WebDriverWait(driver, 1.5, poll_frequency=0.05).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'))
    except Exception:  # noqa: BLE001 - a quick run may be over before the widget shows
        pass
    WebDriverWait(driver, timeout).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'))
    time.sleep(0.5)  # (plotly draws after the run)


def _headline(driver) -> dict[str, str]:
    out = {}
    for m in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]'):
        label = m.find_element(By.CSS_SELECTOR, '[data-testid="stMetricLabel"]').text.strip()
        out[label] = m.find_element(By.CSS_SELECTOR, '[data-testid="stMetricValue"]').text.strip()
    return out


def _choose(driver, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label` (a combobox: open it, click the option)."""
    box = driver.find_element(By.CSS_SELECTOR, f'input[role="combobox"][aria-label="{label}"]')
    box.find_element(By.XPATH, "following-sibling::button").click()
    items = _wait(driver, '[role="option"]')
    match = [i for i in items if i.text.strip() == option]
    assert match, f"{label}: no option {option!r} in {[i.text for i in items]}"
    match[0].click()
    _settled(driver)
    assert box.get_attribute("value") == option


def _tab(driver, name: str) -> None:
    tabs = [t for t in driver.find_elements(By.CSS_SELECTOR, '[role="tab"]') if t.text.strip() == name]
    assert tabs, f"no tab {name!r}"
    tabs[0].click()
    _settled(driver)


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"dashboard-{name}.png"))


def test_dashboard_in_a_real_browser(server, browser):
    d = browser
    d.get(server)
    _wait(d, '[data-testid="stMetricValue"]', timeout=60)
    _wait(d, ".js-plotly-plot .main-svg", timeout=60)
    _settled(d)
    _shot(d, "1-loaded")
    assert not d.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert _console_errors(d) == []
    first = _headline(d)
    throughput = next(k for k in first if k.startswith("Decode tok/s"))
    assert first[throughput].replace(",", "").replace(".", "").isdigit(), first

    _choose(d, "Model", "llama-3.2-1b")
    _shot(d, "2-model")
    second = _headline(d)
    assert float(second[throughput].replace(",", "")) > 2 * float(first[throughput].replace(",", ""))

    _choose(d, "Hardware", "h100-sxm")
    _choose(d, "KV block size (tokens per page)", "16")
    _shot(d, "3-block-size")
    third = _headline(d)
    capacity = next(k for k in third if k.startswith("KV capacity"))
    assert third != second and third[capacity] != second[capacity]

    for name in ("Page size", "Roofline", "Compare", "Hardware"):
        _tab(d, name)
        _shot(d, f"4-tab-{name.lower().replace(' ', '-')}")
        assert not d.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), name
    _tab(d, "Simulate")
    run = WebDriverWait(d, 20).until(EC.element_to_be_clickable(
        (By.XPATH, "//button[.//p[text()='Run simulation']]")))
    run.click()
    _wait(d, '[data-testid="stDataFrame"]', timeout=60)
    _settled(d, timeout=60)
    _shot(d, "5-simulated")
    d.set_window_size(1280, 4200)  # (the whole tab: Streamlit scrolls inside the page, not the window)
    time.sleep(1.0)
    _shot(d, "6-simulated-whole")
    d.set_window_size(1280, 1100)
    assert "p99 TTFT (ms)" in _headline(d)
    assert len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3  # the report's figures
    assert not d.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert _console_errors(d) == []


def test_the_url_opens_the_page_as_shared(server, browser):
    d = browser
    d.get(f"{server}/?hw=h200&model=llama-3.2-1b&block_size=32&batch=8")
    _wait(d, '[data-testid="stMetricValue"]', timeout=60)
    _settled(d)
    box = d.find_element(By.CSS_SELECTOR, 'input[role="combobox"][aria-label="KV block size (tokens per page)"]')
    assert box.get_attribute("value") == "32"
    assert d.find_element(By.CSS_SELECTOR, 'input[role="combobox"][aria-label="Model"]').get_attribute("value") \
        == "llama-3.2-1b"
    _shot(d, "7-from-url")
    _choose(d, "Model", "llama-3.1-8b")
    assert "model=llama-3.1-8b" in d.current_url and "block_size=32" in d.current_url
