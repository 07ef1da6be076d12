"""report.html in a real browser engine: images render, links resolve, no console errors; full-page screenshot.

Skipped unless playwright and a system chromium are present (.ci/run installs both). Set
CLT_PIPE_SCREENSHOTS=DIR to keep the screenshot; otherwise it lands in pytest's tmp folder.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest


def _shot_path(tmp_path: Path, name: str) -> Path:
    keep = os.environ.get("CLT_PIPE_SCREENSHOTS")
    return Path(keep) / name if keep else tmp_path / name


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "screenshot is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_checker_finds_what_a_browser_would_show(tmp_path, page_checker):
    """The checker is not vacuous: each kind of breakage in a small page is reported."""
    (tmp_path / "there.html").write_text("<p>here</p>")
    page = tmp_path / "broken.html"
    page.write_text("""<!doctype html><html><head><title>t</title></head><body id="top">
      <img alt="ok" src="data:image/gif;base64,R0lGODlhAQABAAAAACwAAAAAAQABAAA=">
      <img alt="bad" src="data:image/png;base64,AAAA">
      <a href="#top">fine</a> <a href="#nowhere">dangling</a>
      <a href="there.html">fine</a> <a href="missing.html">missing</a>
      <script>console.error("boom")</script></body></html>""")
    problems = page_checker.problems(page)
    text = "\n".join(problems)
    assert "alt='bad'" in text and "alt='ok'" not in text
    assert "'#nowhere'" in text and "'#top'" not in text
    assert "missing.html" in text and "there.html" not in text
    assert "console error: boom" in text
    assert len(problems) == 4, problems


@pytest.fixture
def report(full_report):
    """The full report (every part) tests/test_analyze.py checks, of a tiny store and a random CLT."""
    cfg, _ = full_report
    return Path(cfg.out) / "report.html"


def test_report_renders_in_chromium(report, tmp_path, page_checker):
    shot = _shot_path(tmp_path, "report.png")
    problems = page_checker.problems(report, screenshot=shot)
    assert problems == [], "\n".join(problems)
    width, height = _png_size(shot)
    assert width >= 1000 and height > 2 * width, (width, height)  # a long page, not a blank viewport
