"""
A real headless browser for the tests: Debian's chromium driven by Playwright for Python.

Playwright's own browser download cannot work offline, so the system chromium is launched through
`executable_path` (`scripts/test.sh` installs it with apt-get when it is missing). Without a browser the tests
that need one are skipped with the reason, except under CI (`CI=true`), where they fail.

Each `page` records what the browser logs: console errors, uncaught exceptions and Content-Security-Policy
violations. It also refuses every request that leaves 127.0.0.1, so a page that needs the network fails its test.
A test ends with `log.assert_clean()` (the fixture checks it too), allowing only the failed requests it expects.
"""

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"no browser under CI: {reason}")
    pytest.skip(reason)


@dataclass
class BrowserLog:
    """What the browser reported while a test ran."""

    errors: list[str] = field(default_factory=list)
    offsite: list[str] = field(default_factory=list)
    allowed: list[re.Pattern] = field(default_factory=list)

    def allow_failed_request(self, status: int) -> None:
        """The test expects one request to fail with `status`: Chromium logs that as a console error."""
        self.allowed.append(re.compile(rf"Failed to load resource: the server responded with a status of {status}\b"))

    def assert_clean(self) -> None:
        """No console errors, uncaught exceptions or CSP violations beyond the allowed ones; nothing left 127.0.0.1."""
        unexpected = [e for e in self.errors if not any(p.search(e) for p in self.allowed)]
        assert not unexpected, f"the browser logged errors: {unexpected}"
        assert not self.offsite, f"the page tried to reach other hosts: {self.offsite}"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """
    One headless chromium per test module.

    Not per session: Playwright's sync API keeps an event loop running in this thread while it is open, and the
    asyncio tests of the modules that run after it could not start theirs.
    """
    try:
        from playwright.sync_api import Error, sync_playwright  # noqa: PLC0415 (a missing package skips, not errors)
    except ImportError:
        _unavailable("playwright is not installed (pip install '.[test]')")
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as e:
            _unavailable(f"chromium did not start: {e.message.splitlines()[0]}")
        yield instance
        instance.close()


@pytest.fixture
def browser_log() -> BrowserLog:
    """The current test's browser log."""
    return BrowserLog()


@pytest.fixture
def page(browser, browser_log: BrowserLog) -> Iterator[object]:
    """A fresh browser context (empty storage) and page at 1280x800, with its log recorded and checked at the end."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)

    def refuse(route) -> None:
        browser_log.offsite.append(route.request.url)
        route.abort()

    # Only requests to other hosts are intercepted: an intercepted request waits for this (Python) side to answer,
    # which it does only while the test is inside a Playwright call.
    context.route(re.compile(r"^[a-z]+://(?!127\.0\.0\.1[:/])"), refuse)
    # Chromium logs CSP violations as console errors; report them from the page too, in case one is only an event.
    context.add_init_script(
        "document.addEventListener('securitypolicyviolation',"
        " e => console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI))"
    )
    tab = context.new_page()
    tab.on("console", lambda m: browser_log.errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: browser_log.errors.append(f"uncaught: {e}"))
    tab.set_default_timeout(60_000)  # a loaded 2-core machine
    from playwright.sync_api import expect  # noqa: PLC0415 (the browser fixture has found playwright)

    expect.set_options(timeout=60_000)
    yield tab
    context.close()
    browser_log.assert_clean()


def screenshot(tab, name: str, full_page: bool = False) -> Path:
    """Save a screenshot (of the viewport, or the whole page) under `test-artifacts/` (or `TEST_ARTIFACTS`)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    tab.screenshot(path=str(path), full_page=full_page)
    return path
