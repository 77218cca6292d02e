"""Real-browser tests of the HTML views: headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, installed by ``make test`` when
missing), not Playwright's own download, so the tests run offline. One browser starts per
test run (the session-scoped ``browser`` fixture); each test gets fresh pages from the
``open_page`` fixture, which writes the HTML to a temporary file and loads it from disk.

Strict by design, so a broken view cannot pass:

* a missing ``chromium`` is a test **failure** (never a skip), naming the fix;
* a page may not fetch anything from the network: every ``http(s)`` request is blocked
  and fails the test at teardown (the views must work offline: notebooks, CI);
* an uncaught JavaScript error on a page fails the test at teardown.

``shot_summary`` reads a screenshot by content, not by pixels: its background colour,
how much of it is ink, and the contrast of the ink against the background (a dark-theme
table with dark text has a contrast near 1).

Example (in a test; the fixtures are registered in ``tests/conftest.py``)::

    def test_hello(open_page):
        page = open_page("<p id='x'>hello</p>")
        assert page.inner_text("#x") == "hello"
        shot = shot_summary(page.locator("#x").screenshot())
        assert shot.ink > 0.01 and shot.contrast > 4
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # playwright is imported when a browser test runs, not with conftest
    from playwright.sync_api import Browser, Page

CHROMIUM_ENV = "JAXSURGERY_CHROMIUM"


def chromium_executable() -> str:
    """The Chromium to drive: ``$JAXSURGERY_CHROMIUM``, else ``chromium`` on the PATH.

    Fails the calling test (never skips it) when there is none.
    """
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"no Chromium at `{path}`: the browser tests need it. `make test` installs it "
            f"(apt-get install -y chromium), or set {CHROMIUM_ENV}=/path/to/chromium.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the whole test run."""
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def open_page(browser: Browser, tmp_path) -> Iterator[Callable[..., Page]]:
    """``open_page(html, *, width=1200, height=800, dark=False) -> Page``.

    Writes ``html`` to a file under ``tmp_path`` and opens it in a fresh page (a whole
    document, or a fragment such as a ``_repr_html_``, which is wrapped in one).
    ``dark=True`` emulates ``prefers-color-scheme: dark`` and gives the page a dark
    background, like a dark notebook theme. At teardown the test fails if a page threw
    an uncaught JavaScript error or tried to reach the network.
    """
    contexts = []
    errors: list[str] = []
    blocked: list[str] = []

    def block(route) -> None:
        blocked.append(route.request.url)
        route.abort()

    def open_(html: str, *, width: int = 1200, height: int = 800, dark: bool = False) -> Page:
        context = browser.new_context(
            viewport={"width": width, "height": height},
            color_scheme="dark" if dark else "light",
        )
        contexts.append(context)
        context.route("http://**/*", block)
        context.route("https://**/*", block)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        if "<html" not in html.lower():
            style = "background:#111;color:#ddd" if dark else "background:#fff;color:#000"
            html = f"<!doctype html><html><head><meta charset='utf-8'></head><body style='{style}'>{html}</body></html>"
        path = tempfile.NamedTemporaryFile(
            "w", suffix=".html", dir=tmp_path, delete=False, encoding="utf-8"
        )
        with path:
            path.write(html)
        page.goto(f"file://{path.name}")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not blocked, f"the page tried to reach the network (it must work offline): {blocked}"


@dataclasses.dataclass(frozen=True)
class Shot:
    """What a screenshot shows, by content.

    Attributes:
        width, height: its size in pixels.
        background: the most common colour, as ``(r, g, b)``.
        ink: the fraction of pixels that differ clearly from the background.
        contrast: WCAG contrast ratio (1 to 21) between the background and the ink
            colour farthest from it in luminance (1 when there is no ink).
    """

    width: int
    height: int
    background: tuple[int, int, int]
    ink: float
    contrast: float

    @property
    def dark(self) -> bool:
        """Whether the background is dark (relative luminance under 0.2)."""
        return _luminance(self.background) < 0.2


def _luminance(rgb: tuple[int, int, int]) -> float:
    def channel(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def shot_summary(png: bytes) -> Shot:
    """Summarise a PNG screenshot (``page.screenshot()`` / ``locator.screenshot()``)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    total = image.width * image.height
    counts = collections.Counter({rgb: n for n, rgb in image.getcolors(maxcolors=total)})
    background = counts.most_common(1)[0][0]
    far = [p for p in counts if sum(abs(a - b) for a, b in zip(p, background)) > 96]
    ink = sum(counts[p] for p in far) / total
    lb = _luminance(background)
    # the ink colour farthest in luminance from the background, among colours common
    # enough to be text (not a stray anti-aliasing pixel)
    common = [p for p in far if counts[p] >= max(3, total // 20000)] or far
    extreme = max((abs(_luminance(p) - lb), _luminance(p)) for p in common)[1] if common else lb
    hi, lo = max(lb, extreme), min(lb, extreme)
    return Shot(image.width, image.height, background, ink, (hi + 0.05) / (lo + 0.05))
