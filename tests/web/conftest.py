"""Fixtures for the dashboard's browser tests: Debian's Chromium driven by Playwright."""

import os
import shutil
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def chromium_path() -> str | None:
    return os.environ.get("DSTACK_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser():
    # per test: Playwright's sync API runs an event loop in this thread while it is open, and the next
    # module-scoped server (PostgreSQL: tests/pg.py's asyncio.run) must not be set up inside it
    path = chromium_path()
    if path is None:
        pytest.skip("the dashboard's browser tests need Chromium (apt-get install chromium, or DSTACK_TEST_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dashboard's browser tests need playwright")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(30_000)
    try:
        yield p
    finally:
        context.close()


def sign_in(page, server, token: str | None = None) -> None:
    page.goto(server.url + "/")
    page.get_by_label("Token").fill(token or server.token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/runs")


def screenshot(page, name: str, full_page: bool = False) -> None:
    """With DSTACK_TEST_SCREENSHOTS=1, keep a screenshot from the run in docs/ (the README shows them);
    off by default, so a test run leaves the working tree as it was."""
    if os.environ.get("DSTACK_TEST_SCREENSHOTS") == "1":
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(DOCS / name), full_page=full_page)
