"""Headless-browser checks of the static HTML the pipeline writes (atlas pages; reusable for report.html).

Skipped unless Playwright is importable and a Chromium is installed (Debian: ``apt-get install chromium``;
Playwright's own browser download is not needed: ``CHROMIUM`` below is launched directly). The browser gets no
network: every request that is not a local file or an inline data URI is aborted and reported.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

CHROMIUM = os.environ.get("CLT_PIPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

needs_browser = pytest.mark.skipif(sync_playwright is None or not Path(CHROMIUM).is_file(),
                                   reason="needs playwright (pip) and chromium (apt) installed")


def check_page(path: str | Path, screenshot: str | Path | None = None) -> list[str]:
    """Open ``path`` headlessly without network; return every problem found (empty list = fine):
    a console error or uncaught exception, a blocked network request, an <img> that did not decode
    (naturalWidth 0), a link to a local file that does not exist or to a #fragment that the page lacks.
    Saves a full-page PNG to ``screenshot`` if given."""
    path = Path(path).resolve()
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error"
                    else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

            def route(r):
                if r.request.url.startswith(("file:", "data:")):
                    r.continue_()
                else:
                    problems.append(f"network request blocked: {r.request.url}")
                    r.abort()

            page.route("**/*", route)
            page.goto(path.as_uri(), wait_until="load")
            for img in page.eval_on_selector_all(
                    "img", "els => els.map(e => [e.getAttribute('src').slice(0, 80), e.complete, e.naturalWidth])"):
                if not img[1] or img[2] <= 0:
                    problems.append(f"image did not load: {img[0]}")
            ids = set(page.eval_on_selector_all("[id]", "els => els.map(e => e.id)"))
            for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
                u = urlsplit(href)
                if u.scheme in ("http", "https"):
                    continue  # an outgoing link is not a resource of the page
                if u.scheme != "file":
                    problems.append(f"unexpected link {href}")
                    continue
                target = Path(unquote(u.path))
                if not target.is_file():
                    problems.append(f"broken link {href}")
                elif u.fragment and target == path and u.fragment not in ids:
                    problems.append(f"broken anchor {href}")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return problems


@needs_browser
def test_atlas_pages_render_in_a_browser(tmp_path):
    from clt_pipe.testing import plantedatlas as P
    from tests.test_atlas import _FakeDataset, _finish

    env = P.build(tmp_path / "env")
    s = _finish(env, tmp_path / "out", _FakeDataset(40))
    root = Path(s["dir"])
    page = root / "features" / "L1-F3.html"
    assert page.is_file()
    for p, shot in ((root / "index.html", tmp_path / "atlas-index.png"), (page, tmp_path / "atlas-L1-F3.png")):
        assert check_page(p, shot) == []
        assert shot.stat().st_size > 0
    n_img = sum(len(f["images"]) for f in json.loads((root / "atlas.json").read_text())["features"])
    assert n_img > 0


@needs_browser
def test_check_page_finds_problems(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><img src='missing.png'><a href='nowhere.html'>x</a><a href='#nope'>y</a>"
                   "<img src='https://example.invalid/x.png'><script>undefinedFunction()</script></body></html>")
    problems = check_page(bad)
    for needle in ("missing.png", "nowhere.html", "#nope", "network request blocked", "page error"):
        assert any(needle in p for p in problems), (needle, problems)
