"""Open an HTML report in a real headless Chromium (selenium) and check what a reviewer would see.

Reading the HTML text proves little about a report: a corrupt data URI, a script error or a
page that renders white all pass a text check. Here the page is loaded and rendered by the
browser, and :func:`check_report` fails on any SEVERE console message, any image the browser
could not decode, and a blank screenshot. Without Chromium, chromedriver (Debian ``chromium``
and ``chromium-driver``; ``make test`` installs them as root) or selenium, :func:`browser_missing`
gives the reason to skip.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.quality.report import TABLE_ID

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW_PX = (1400, 1000)
CONSOLE_READS = 3
CONSOLE_READ_PAUSE_S = 0.1
# A white page with a line of text has a grey-level standard deviation of 1-3; the report with thumbnails, far more.
BLANK_STD = 8.0

# A rendered <img> with nothing decoded has complete true but naturalWidth 0 (a broken data URI, a bad PNG).
BROKEN_IMAGES_JS = """
return Array.from(document.images)
  .filter(img => !(img.complete && img.naturalWidth > 0))
  .map(img => img.alt || img.src.slice(0, 60));
"""


def browser_missing() -> str | None:
    """Why the browser checks cannot run here, or None when Chromium, chromedriver and selenium are all present."""
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM} (Debian package chromium; `make test` installs it as root)"
    if not CHROMEDRIVER.exists():
        return f"chromedriver not found at {CHROMEDRIVER} (Debian package chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def skip_without_browser() -> None:
    """Skip the calling test (or fixture) with the reason when the browser checks cannot run."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)


def start_chromium() -> Any:
    """A headless Chromium driven by selenium, with the browser console captured; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW_PX[0]},{WINDOW_PX[1]}"):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def table_rows(driver: Any) -> tuple[list[str], list[bool]]:
    """The case names and flagged flags of the report table's rows, in the order shown now.

    Args:
        driver: the selenium driver with the report loaded.
    """
    rows = driver.execute_script(
        f"return Array.from(document.querySelectorAll('#{TABLE_ID} tbody tr'))"
        ".map(r => [r.getAttribute('data-case'), r.getAttribute('data-flagged')]);")
    return [case for case, _ in rows], [flag == "true" for _, flag in rows]


def check_report(path: Path, driver: Any = None) -> dict[str, Any]:
    """Load a report in headless Chromium and assert that it renders cleanly.

    Raises AssertionError on any SEVERE browser console message (a script error, a resource
    that failed), on any image not decoded, and on a blank screenshot.

    Args:
        path: the HTML file.
        driver: a running driver from :func:`start_chromium` to reuse; None starts and quits one.

    Returns:
        ``cases`` (row case names in order), ``flagged`` (row flags in order), ``screenshot``
        (PNG bytes) and ``console`` (every console message, for the caller's own checks).
    """
    if driver is None:
        driver = start_chromium()
        try:
            return check_report(path, driver)
        finally:
            driver.quit()
    from PIL import Image

    driver.get("about:blank")  # the same URL again (a file rewritten in place) must be a fresh load
    driver.get_log("browser")  # drain what an earlier page left, so only this page's messages count
    driver.get(Path(path).resolve().as_uri())  # returns after the load event: images are fetched and decoded
    # Console entries reach the driver asynchronously; on a loaded machine a script error of the load can
    # arrive after get() returns, so the log is read a few times.
    console = []
    for _ in range(CONSOLE_READS):
        console += driver.get_log("browser")
        time.sleep(CONSOLE_READ_PAUSE_S)
    severe = [entry["message"] for entry in console if entry["level"] == "SEVERE"]
    assert not severe, f"console errors in {path}: {severe}"
    broken = driver.execute_script(BROKEN_IMAGES_JS)
    assert not broken, f"images that did not load in {path}: {broken}"
    screenshot = driver.get_screenshot_as_png()
    grey = np.asarray(Image.open(io.BytesIO(screenshot)).convert("L"), dtype=np.float32)
    assert grey.std() > BLANK_STD, f"{path} renders blank (grey-level std {grey.std():.2f})"
    cases, flagged = table_rows(driver)
    return {"cases": cases, "flagged": flagged, "screenshot": screenshot, "console": console}
