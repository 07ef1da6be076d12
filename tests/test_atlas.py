"""The feature atlas on a store with planted features (clt_pipe/testing/plantedatlas.py): top images, heatmaps,
footprints, logit effects, thumbnails through provenance, self-contained HTML, bad input, bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clt_pipe import cli
from clt_pipe.analyze.atlas.run import run_atlas
from clt_pipe.analyze.atlas.scan import FeatureScan, stream_inputs
from clt_pipe.config import AtlasConfig, build
from clt_pipe.datasets.base import ImageRecord
from clt_pipe.errors import CltPipeError, ConfigError
from clt_pipe.clt.rundir import load_fitted
from clt_pipe.store.reader import ActivationStore
from clt_pipe.testing import plantedatlas as P


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return P.build(tmp_path_factory.mktemp("atlas"))


def _cfg(env, out, **kw):
    return build(AtlasConfig, {"store": env["store"], "clt": env["clt"], "out": str(out), "device": "cpu",
                               "top_images": 3, "top_per_layer": 2, "read_threads": 2, **kw})


def _feature(atlas: dict, layer: int, f: int) -> dict:
    (hit,) = [x for x in atlas["features"] if (x["layer"], x["feature"]) == (layer, f)]
    return hit


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.refs.append(a.get("src") or "")
        if tag == "a" and "href" in a:
            self.refs.append(a["href"])
        if tag in ("script", "link") and (a.get("src") or a.get("href")):
            self.refs.append(a.get("src") or a.get("href"))


def static_problems(atlas_dir: Path) -> list[str]:
    """Every page parses; every <img>/<a>/<script>/<link> reference is an inline data URI or a file inside
    the atlas dir (and a #fragment names an element of that page)."""
    root = atlas_dir.resolve()
    problems, parsed = [], {}
    pages = sorted(root.rglob("*.html"))
    for page in pages:
        p = _Refs()
        p.feed(page.read_text(encoding="utf-8"))
        p.close()
        parsed[page] = p
    for page, p in parsed.items():
        for ref in p.refs:
            if ref.startswith("data:"):
                continue
            u = urlsplit(ref)
            if u.scheme or u.netloc:
                problems.append(f"{page.name}: external reference {ref}")
                continue
            target = (page.parent / unquote(u.path)).resolve() if u.path else page
            if not target.is_relative_to(root) or not target.is_file():
                problems.append(f"{page.name}: {ref} does not resolve inside the atlas")
            elif u.fragment and u.fragment not in parsed.get(target, _Refs()).ids:
                problems.append(f"{page.name}: {ref}: no element #{u.fragment}")
    return problems


def test_planted_feature_top_images_heatmap_footprint_logits(env, tmp_path):
    summary = run_atlas(_cfg(env, tmp_path, features=["1:3", "2:7"]))
    atlas = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    f = _feature(atlas, *P.PLANTED)
    want = sorted(P.PLANTED_IMAGES, key=lambda i: -P.PLANTED_IMAGES[i][1])
    assert [i["image"] for i in f["images"]] == want  # exactly the planted images, strongest first (not 9)
    for img in f["images"]:
        pos, val = P.PLANTED_IMAGES[img["image"]]
        assert img["heat_peak_patch"] == pos
        assert img["max_act"] == pytest.approx(val, rel=1e-3)
        assert img["cls_act"] == 0.0
        # the heatmap PNG (no base image here) is brightest on the planted patch's block
        px = np.asarray(Image.open(tmp_path / "atlas" / img["png"]).convert("L"), np.float64)
        gh, gw = atlas["grid"]
        blocks = px.reshape(gh, px.shape[0] // gh, gw, px.shape[1] // gw).mean((1, 3))
        assert np.unravel_index(blocks.argmax(), blocks.shape) == divmod(pos - 1, gw)
    assert f["footprint"] == pytest.approx(P.DEC_NORMS, rel=1e-5)
    assert f["logits"]["towards"][0]["class"] == "b" and f["logits"]["away"][0]["class"] == "a"
    assert f["density_patches"] == pytest.approx(3 / (40 * 16))
    assert f["density_cls"] == pytest.approx(1 / 40)  # the distractor's CLS
    assert f["mean_act_patches"] == pytest.approx(2.5, rel=1e-3)
    # with a 4th slot the distractor (CLS only, weaker) comes last, its heatmap empty
    wider = run_atlas(_cfg(env, tmp_path / "wide", top_images=4))
    f4 = _feature(json.loads((Path(wider["dir"]) / "atlas.json").read_text()), *P.PLANTED)
    assert [i["image"] for i in f4["images"]] == want + [P.DISTRACTOR]
    assert f4["images"][-1]["cls_act"] == pytest.approx(0.1, rel=1e-2)
    # ranking: the dense background feature leads layer 0; a listed feature that never fired is still shown
    assert [(x["layer"], x["feature"]) for x in atlas["features"] if x["layer"] == 0][0] == P.BACKGROUND
    never = _feature(atlas, 2, 7)
    assert never["listed"] and never["images"] == [] and never["score"] == 0.0
    assert summary["n_features"] == len(atlas["features"])
    # no dataset for a synthetic store: everything renders, and the pages say why there are no thumbnails
    assert not summary["thumbnails"] and "not reachable" in summary["images_note"]
    assert "not reachable" in (tmp_path / "atlas" / "index.html").read_text()
    assert static_problems(tmp_path / "atlas") == []


class _FakeDataset:
    """Solid-colour images whose provenance matches the synthetic store's images.parquet (unless shifted)."""

    def __init__(self, n: int, prefix: str = "synthetic"):
        self.n, self.prefix = n, prefix

    def __len__(self):
        return self.n

    def record(self, i):
        return ImageRecord(index=i, source=f"{self.prefix}#{i}", label=i % 2)

    def load_image(self, i):
        return Image.new("RGB", (40, 30), (0, 200, 0))


def _finish(env, out, dataset):
    from clt_pipe.analyze.atlas.run import finish_atlas

    store = ActivationStore(env["store"])
    clt, _ = load_fitted(env["clt"])
    scan = FeatureScan(clt, 3)
    for b in stream_inputs(store, "cpu", read_threads=2):
        scan.update(b)
    return finish_atlas(store, clt, scan.result(), out, listed=[], top_per_layer=1, template_set="single",
                        device="cpu", thumb_px=32, dataset=dataset)


def test_thumbnails_come_through_provenance(env, tmp_path):
    s = _finish(env, tmp_path / "ok", _FakeDataset(40))
    atlas = json.loads((Path(s["dir"]) / "atlas.json").read_text())
    imgs = [i for f in atlas["features"] for i in f["images"]]
    assert imgs and all(i["pixels"] for i in imgs) and s["images_note"] is None
    f = _feature(atlas, *P.PLANTED)
    px = np.asarray(Image.open(Path(s["dir"]) / f["images"][0]["png"]).convert("RGB"), np.float64)
    pos = P.PLANTED_IMAGES[f["images"][0]["image"]][0]
    r, c = divmod(pos - 1, 4)
    cold = px[0:8, 0:8] if (r, c) != (0, 0) else px[24:32, 24:32]
    assert cold.mean(axis=(0, 1)) == pytest.approx([0, 200, 0], abs=3)  # a patch at 0 shows the image itself
    assert abs(px[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].mean(axis=(0, 1)) - [0, 200, 0]).max() > 50
    # another dataset under the same root (sources differ): no wrong pictures, and the page says so
    s2 = _finish(env, tmp_path / "other", _FakeDataset(40, prefix="elsewhere"))
    atlas2 = json.loads((Path(s2["dir"]) / "atlas.json").read_text())
    assert not any(i["pixels"] for f in atlas2["features"] for i in f["images"])
    assert "images.parquet" in s2["images_note"]


def test_cli_and_bad_input(env, tmp_path):
    res = CliRunner().invoke(cli.app, ["atlas", "--store", env["store"], "--clt", env["clt"], "--out",
                                       str(tmp_path), "--device", "cpu", "--features", "1:3", "--top-per-layer", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "atlas" / "features" / "L1-F3.html").is_file()
    toml = tmp_path / "atlas.toml"
    toml.write_text(f'store = "{env["store"]}"\nclt = "{env["clt"]}"\nout = "{tmp_path}"\ntop_images = 2\n')
    from clt_pipe.pipeline import stage_config

    assert stage_config(AtlasConfig, "atlas", str(toml), {}).top_images == 2
    with pytest.raises(CltPipeError, match="outside the CLT"):
        run_atlas(_cfg(env, tmp_path / "bad", features=["1:99"]))
    assert not (tmp_path / "bad" / "atlas").exists()
    with pytest.raises(ConfigError, match="LAYER:FEATURE"):
        _cfg(env, tmp_path, features=["3-17"])
    with pytest.raises(CltPipeError, match="template set"):
        run_atlas(_cfg(env, tmp_path / "bad", template_set="nope"))


def _traced_peak(env_root: Path, n_images: int) -> int:
    e = P.build(env_root, n_images=n_images)
    store = ActivationStore(e["store"])
    clt, _ = load_fitted(e["clt"])
    tracemalloc.start()
    try:
        scan = FeatureScan(clt, 3)
        for b in stream_inputs(store, "cpu", read_threads=2):
            scan.update(b)
        scan.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_scan_memory_does_not_grow_with_the_store(tmp_path):
    small = _traced_peak(tmp_path / "s", 40)
    large = _traced_peak(tmp_path / "l", 400)
    # numpy/python allocations of the streamed pass (torch's are not traced; they are per-chunk too)
    assert large < 1.5 * small + 256 * 1024, (small, large)


def test_analyze_part_writes_atlas_linked_from_report(env, tmp_path):
    from clt_pipe.analyze.run import run_analyze
    from clt_pipe.config import AnalyzeConfig

    cfg = build(AnalyzeConfig, {"store": env["store"], "clt": env["clt"], "out": str(tmp_path), "device": "cpu",
                                "only": ["fidelity", "atlas"], "atlas_features": ["2:7"], "atlas_top_images": 3,
                                "read_threads": 2})
    summary = run_analyze(cfg)
    assert Path(summary["atlas"]).is_file()
    assert "href='atlas/index.html'" in (tmp_path / "report.html").read_text()
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["results"]["atlas"]["n_features"] >= 3 and "atlas" in rep["results"]["timings_s"]
    atlas = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    # the shared pass gives the same top images as the stand-alone command
    assert [i["image"] for i in _feature(atlas, *P.PLANTED)["images"]] == sorted(
        P.PLANTED_IMAGES, key=lambda i: -P.PLANTED_IMAGES[i][1])
    assert static_problems(tmp_path / "atlas") == []
