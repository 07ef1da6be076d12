"""Open an HTML page in a real browser engine (headless chromium driven by playwright) and list what is wrong.

The report and atlas pages are read by people in browsers; string checks on the HTML miss a PNG that does not
decode, a link to a file that was never written, or a script error. Playwright's own browser download is not
used: the system's chromium (Debian ``apt-get install chromium``) is driven through ``executable_path``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")

# Runs in the page: every <img> that did not decode, and every link inside the page or to a local file.
_INSPECT_JS = """() => {
  const images = [...document.images].map(img => ({src: (img.getAttribute('src') || '').slice(0, 80),
      alt: img.alt, ok: img.complete && img.naturalWidth > 0}));
  const links = [...document.querySelectorAll('a[href]')].map(a => ({href: a.getAttribute('href'), url: a.href}));
  const ids = [...document.querySelectorAll('[id]')].map(e => e.id)
      .concat([...document.querySelectorAll('a[name]')].map(e => e.name));
  return {images, links, ids, title: document.title, height: document.body ? document.body.scrollHeight : 0};
}"""


def chromium_path() -> str | None:
    """``$CLT_PIPE_CHROMIUM`` or the first chromium on PATH; None when there is none."""
    env = os.environ.get("CLT_PIPE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_missing() -> str | None:
    """Why a page cannot be checked here (for ``pytest.skip``), or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; it is in the dev extra)"
    if chromium_path() is None:
        return "no chromium on PATH (apt-get install chromium, or set CLT_PIPE_CHROMIUM)"
    return None


class PageChecker:
    """One headless chromium for several pages (starting one costs about 0.6 s): ``with PageChecker() as check:
    check.problems(page)``."""

    def __enter__(self) -> PageChecker:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=chromium_path(), headless=True)
        except BaseException:
            self._pw.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._browser.close()
        finally:
            self._pw.stop()

    def problems(self, html_path: str | Path, screenshot: str | Path | None = None, *, timeout_ms: int = 60_000,
                 width: int = 1280) -> list[str]:
        """Load ``html_path``; one line per problem (empty list: the page is fine).

        Problems: console errors and uncaught script errors, requests that failed, requests leaving the machine
        (a report must be self-contained), images that did not decode (naturalWidth 0), links to a
        ``#fragment`` that no element has, links to local files that do not exist. ``screenshot``: a full-page
        PNG goes there.
        """
        page_file = Path(html_path).resolve()
        if not page_file.is_file():
            return [f"{page_file}: no such file"]
        problems: list[str] = []
        page = self._browser.new_page(viewport={"width": width, "height": 900})
        try:
            page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:120]} ({r.failure})"))

            def offline(route):
                problems.append(f"external request: {route.request.url[:120]}")
                route.abort()

            page.route(lambda url: not url.startswith(("file:", "data:", "blob:", "about:")), offline)
            page.goto(page_file.as_uri(), wait_until="load", timeout=timeout_ms)
            info = page.evaluate(_INSPECT_JS)
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            page.close()
        for img in info["images"]:
            if not img["ok"]:
                problems.append(f"image does not render: alt={img['alt']!r} src={img['src']!r}")
        ids = set(info["ids"])
        for link in info["links"]:
            problems.extend(_link_problem(link["href"], link["url"], page_file, ids))
        return problems


def _link_problem(href: str, url: str, page_file: Path, ids: set[str]) -> list[str]:
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "mailto"):
        return []  # outside the report: not checked offline
    if parsed.scheme != "file":
        return [f"link {href!r}: unexpected scheme {parsed.scheme!r}"]
    target = Path(unquote(parsed.path))
    if target == page_file:
        frag = unquote(parsed.fragment)
        return [] if not frag or frag in ids else [f"link {href!r}: no element with id {frag!r}"]
    if not target.exists():
        return [f"link {href!r}: {target} does not exist"]
    return []
