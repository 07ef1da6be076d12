"""report.html in a real browser engine: images render, links resolve, no console errors; full-page screenshot.

Skipped unless playwright and a system chromium are present (.ci/run installs both). Set
CLT_PIPE_SCREENSHOTS=DIR to keep the screenshot; otherwise it lands in pytest's tmp folder.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

from clt_pipe.testing.browser import browser_missing, page_problems

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))


def _shot_path(tmp_path: Path, name: str) -> Path:
    keep = os.environ.get("CLT_PIPE_SCREENSHOTS")
    return Path(keep) / name if keep else tmp_path / name


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "screenshot is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_checker_finds_what_a_browser_would_show(tmp_path):
    """The checker is not vacuous: each kind of breakage in a small page is reported."""
    (tmp_path / "there.html").write_text("<p>here</p>")
    page = tmp_path / "broken.html"
    page.write_text("""<!doctype html><html><head><title>t</title></head><body id="top">
      <img alt="ok" src="data:image/gif;base64,R0lGODlhAQABAAAAACwAAAAAAQABAAA=">
      <img alt="bad" src="data:image/png;base64,AAAA">
      <a href="#top">fine</a> <a href="#nowhere">dangling</a>
      <a href="there.html">fine</a> <a href="missing.html">missing</a>
      <script>console.error("boom")</script></body></html>""")
    problems = page_problems(page)
    text = "\n".join(problems)
    assert "alt='bad'" in text and "alt='ok'" not in text
    assert "'#nowhere'" in text and "'#top'" not in text
    assert "missing.html" in text and "there.html" not in text
    assert "console error: boom" in text
    assert len(problems) == 4, problems


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A full report (every part) of a tiny store and a random CLT, as tests/test_analyze.py builds it."""
    from clt_pipe.analyze.run import run_analyze
    from clt_pipe.backbone.loading import load_backbone
    from clt_pipe.clt.model import CrossLayerTranscoder
    from clt_pipe.clt.rundir import save_fitted
    from clt_pipe.clt.spec import CLTSpec
    from clt_pipe.config import AnalyzeConfig, HarvestConfig, build
    from clt_pipe.harvest.run import run_harvest
    from clt_pipe.store.reader import ActivationStore
    from clt_pipe.testing.fakedata import make_fake_imagefolder
    from tests.conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("report-browser")
    make_fake_imagefolder(root / "data", classes=("cat", "dog", "fox", "owl"), per_class=6, size=32)
    torch.manual_seed(0)
    bb = load_backbone(str(TINY_MODEL), "none", "cpu")
    ckpt = root / "tiny.pt"
    torch.save(bb.model.state_dict(), ckpt)
    store_url = str(root / "store.zarr")
    run_harvest(build(HarvestConfig, {"model": str(TINY_MODEL), "pretrained": str(ckpt), "dataset": "imagefolder",
                                      "data_root": str(root / "data"), "store": store_url, "chunk_mb": 0.05,
                                      "batch_size": 8, "template_sets": ["single"], "device": "cpu",
                                      "data_workers": 1}), log=lambda *a: None)
    store = ActivationStore(store_url)
    torch.manual_seed(1)
    clt = CrossLayerTranscoder(CLTSpec(store.n_layers, store.d_model, 128, "relu_topk", 8))
    save_fitted(root / "clt", clt, {"store": {"url": store_url, "fingerprint": store.meta.fingerprint,
                                              "model": store.model, "n_layers": store.n_layers,
                                              "d_model": store.d_model}})
    cfg = build(AnalyzeConfig, {"store": store_url, "clt": str(root / "clt"), "out": str(root / "report"),
                                "data_root": str(root / "data"), "device": "cpu", "batch_size": 8,
                                "retrieval_queries": 3, "retrieval_k": 3, "read_threads": 2, "ablation_keep": 2})
    run_analyze(cfg)
    return Path(cfg.out) / "report.html"


def test_report_renders_in_chromium(report, tmp_path):
    shot = _shot_path(tmp_path, "report.png")
    problems = page_problems(report, screenshot=shot)
    assert problems == [], "\n".join(problems)
    width, height = _png_size(shot)
    assert width >= 1000 and height > 2 * width, (width, height)  # a long page, not a blank viewport
