"""Headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, offline: no browser download,
no Selenium Manager (both the browser and the driver are given), a fresh empty profile, every background
service off. Also a script: `python tests/browser.py explorer/*.html --out docs/explorer` saves a screenshot of
each gate explorer page after a scripted hover and range selection.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1300,1000")


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


@contextlib.contextmanager
def chromium():
    """A Selenium Chrome driver on the system's Chromium, with the browser console and network logs recorded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    driver.get("about:blank")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_ready(driver, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if driver.execute_script("return !!(window.explorer && window.explorer.ready)"):
            return True
        if driver.find_elements("css selector", "body > p[style]"):  # the page's own error line
            return False
        time.sleep(0.05)
    return False


def requests(driver, document: str | None = None) -> list[str]:
    """Every URL asked of the network stack since the last call (from the DevTools performance log); with
    `document`, only those made for that page (Chromium's own pages, such as the first new tab, are not ours)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            params = message["params"]
            if document is None or params.get("documentURL", "").split("#")[0] == document:
                urls.append(params["request"]["url"])
    return urls


def exercise(driver, page: Path, hover_step: int = 1, select: tuple[int, int] = (0, 2), fragment: str = "") -> dict:
    """Open a page from file:// (with a #fragment such as "unit=155"), hover one step, drag-select a range; what
    the page showed at each point."""
    from selenium.webdriver.common.action_chains import ActionChains

    driver.get_log("browser")
    requests(driver)
    driver.get(page.resolve().as_uri() + (f"#{fragment}" if fragment else ""))
    ready = wait_ready(driver)
    seen = {"ready": ready}
    if not ready:
        seen["console"] = driver.get_log("browser")
        return seen
    steps = driver.find_elements("css selector", "#steps .step")
    seen["steps"] = len(steps)
    seen["header_steps"] = driver.execute_script("return window.explorer.header.samples[0].steps")
    seen["hover_before"] = driver.find_element("id", "hover-step").text
    seen["unit"] = driver.execute_script("return window.explorer.state.unit")
    last = len(steps) - 1
    ActionChains(driver).move_to_element(steps[min(hover_step, last)]).perform()
    seen["hover_after"] = driver.find_element("id", "hover-step").text
    seen["hover_gates"] = driver.find_element("id", "hover-gates").text
    seen["hover_top"] = driver.find_element("id", "hover-top").text
    a, b = min(select[0], last), min(select[1], last)
    ActionChains(driver).click_and_hold(steps[a]).move_to_element(steps[b]).release().perform()
    seen["selection"] = driver.find_element("id", "selection").text
    seen["sort"] = driver.execute_script("return document.getElementById('sort').value")
    seen["selected_steps"] = len(driver.find_elements("css selector", "#steps .step.sel"))
    seen["match_column"] = [row.find_elements("css selector", "td")[3].text
                            for row in driver.find_elements("css selector", "#units tbody tr")]
    seen["fires"] = driver.find_element("id", "fires-unit").text
    seen["resources"] = driver.execute_script("return performance.getEntriesByType('resource').length")
    seen["console"] = driver.get_log("browser")
    seen["requests"] = requests(driver, page.resolve().as_uri())
    return seen


def main(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path(".")
    pages = [Path(p) for p in argv if p.endswith(".html") or ".html#" in p]
    out.mkdir(parents=True, exist_ok=True)
    with chromium() as driver:
        for given in pages:
            page, _, fragment = str(given).partition("#")
            page = Path(page)
            seen = exercise(driver, page, hover_step=40, select=(3, 12), fragment=fragment)
            driver.execute_script("window.scrollTo(0, 0)")
            shot = out / f"{page.stem}{'-' + fragment.replace('=', '') if fragment else ''}.png"
            driver.save_screenshot(str(shot))
            from PIL import Image  # matplotlib's dependency: 64 colours keep a page's picture small

            Image.open(shot).convert("RGB").quantize(64).save(shot, optimize=True)
            print(f"{page} -> {shot}: ready {seen['ready']}, console {seen.get('console')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
