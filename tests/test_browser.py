"""The atlas pages in a real browser engine (headless chromium via playwright, no network), through the same
checker as the report (``clt_pipe.testing.browser.PageChecker``). Skipped without playwright and chromium.
"""

from __future__ import annotations

import json
from pathlib import Path


def test_atlas_pages_render_in_a_browser(tmp_path, page_checker):
    from clt_pipe.testing import plantedatlas as P
    from tests.test_atlas import _FakeDataset, _finish

    env = P.build(tmp_path / "env")
    s = _finish(env, tmp_path / "out", _FakeDataset(40))
    root = Path(s["dir"])
    page = root / "features" / "L1-F3.html"
    assert page.is_file()
    for p, shot in ((root / "index.html", tmp_path / "atlas-index.png"), (page, tmp_path / "atlas-L1-F3.png")):
        assert page_checker.problems(p, shot) == []
        assert shot.stat().st_size > 0
    n_img = sum(len(f["images"]) for f in json.loads((root / "atlas.json").read_text())["features"])
    assert n_img > 0
