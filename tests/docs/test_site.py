"""The built site in a real headless Chromium: every page loads cleanly, the search works, the front page renders.

The site is served over HTTP (the search index is fetched by a web worker, which a file:// page may not do). One
Chromium is shared by the module; the browser checks skip when Chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from tests.quality.report_browser import BLANK_STD, BROKEN_IMAGES_JS


def _nav_pages(nav: Any) -> list[str]:
    """Every page of mkdocs.yml's nav, in order."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    return [p for value in nav.values() for p in _nav_pages(value)]


def nav_urls() -> list[str]:
    """The site path of every nav page (directory URLs, as mkdocs.yml has them)."""
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    return ["" if p == "index.md" else p.removesuffix(".md") + "/" for p in _nav_pages(nav)]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site on an HTTP server on a free local port; yields its root URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _load(driver: Any, url: str) -> list[str]:
    """Open ``url``; the SEVERE console messages and the images not decoded."""
    driver.get_log("browser")  # drain what the previous page left
    driver.get(url)
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    broken = driver.execute_script(BROKEN_IMAGES_JS)
    return severe + [f"image not decoded: {b}" for b in broken]


def test_the_nav_lists_every_page_of_the_site(site: Path) -> None:
    pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert set(_nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])) == pages
    for url in nav_urls():
        assert (site / url / "index.html").is_file(), url


def test_every_page_loads_without_console_errors(served: str, driver: Any) -> None:
    urls = nav_urls()
    problems = {url or "/": found for url in urls if (found := _load(driver, served + url))}
    assert not problems, problems
    print(f"{len(urls)} pages loaded, console errors 0")
    title = driver.execute_script("return document.querySelector('article h1').textContent")
    assert title.strip().startswith("Python API")  # the last page really rendered, generated content included


def test_a_missing_script_is_seen_as_a_console_error(served: str, driver: Any) -> None:
    """The check above can fail: a page that fetches what is not there shows up."""
    problems = _load(driver, served + "no-such-page/")
    assert problems and "404" in problems[0]


def test_the_search_finds_exit_code(served: str, driver: Any) -> None:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    _load(driver, served)
    box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")  # in the header at desktop width
    WebDriverWait(driver, 10).until(expected_conditions.element_to_be_clickable(box)).click()
    box.send_keys("exit code")
    seen: list[str] = []

    def expected_links(d: Any) -> list[str] | bool:
        # The result list is re-rendered as each key arrives: read it whole, retry when an element goes stale.
        seen[:] = [a.get_attribute("href") for a in d.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")]
        relevant = any("troubleshooting/" in link or "scheduling/" in link for link in seen)
        return list(seen) if relevant else False

    try:
        links = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,)).until(expected_links)
    except TimeoutException:
        pytest.fail(f"no troubleshooting or scheduling page among the results for 'exit code': {seen}")
    meta = driver.find_element(By.CSS_SELECTOR, ".md-search-result__meta").text
    print(f"search 'exit code': {meta}; first results: {links[:3]}")


def test_the_front_page_renders(served: str, driver: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    from PIL import Image

    assert not _load(driver, served)
    png = driver.get_screenshot_as_png()
    path = tmp_path_factory.mktemp("docs-screenshot") / "front-page.png"
    path.write_bytes(png)
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    print(f"front page screenshot: {path} (grey-level std {grey.std():.1f})")
    assert grey.std() > BLANK_STD, f"the front page renders blank ({path})"
    assert "unet-pipeline" in driver.title
