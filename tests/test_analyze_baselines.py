"""Baselines and paired uncertainty in the analysis: planted lost/gained counts, McNemar, bootstrap, mean- and
zero-ablation, the mean predictor, retrieval against the raw input, unreachable windows, the ablation protocols."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clt_pipe.analyze import ablation as AB
from clt_pipe.analyze import paired as PA
from clt_pipe.analyze import substitution as SU
from clt_pipe.analyze import zeroshot as ZS
from clt_pipe.analyze.means import position_means, train_means
from clt_pipe.analyze.run import run_analyze
from clt_pipe.config import AnalyzeConfig, build
from clt_pipe.errors import ConfigError
from tests.conftest import analyze_config as _cfg
from tests.test_analyze import AdditiveStub, _all_rows, _embed_with


def _planted(n: int, base_right: int, lost: int, gained: int, seed: int = 0):
    """Per-image correctness of a baseline and a variant with exactly ``lost`` / ``gained`` discordant images."""
    rng = np.random.default_rng(seed)
    base = np.zeros(n, bool)
    base[rng.choice(n, base_right, replace=False)] = True
    new = base.copy()
    new[rng.choice(np.flatnonzero(base), lost, replace=False)] = False
    new[rng.choice(np.flatnonzero(~base), gained, replace=False)] = True
    return base, new


def _exact_mcnemar(b: int, c: int) -> float:
    n, m = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2 ** n) if n else 1.0


@pytest.mark.parametrize("n,right,lost,gained", [(359, 348, 3, 0), (200, 150, 7, 2), (100, 60, 5, 5),
                                                 (50, 40, 0, 0)])
def test_paired_delta_on_planted_counts(n, right, lost, gained):
    base, new = _planted(n, right, lost, gained)
    got = PA.paired_delta(base, new)
    assert (got["lost"], got["gained"]) == (lost, gained)
    assert got["mcnemar_p"] == pytest.approx(_exact_mcnemar(lost, gained), rel=1e-9)
    delta = 100.0 * (gained - lost) / n
    assert got["ci_lo_pp"] <= delta <= got["ci_hi_pp"]
    if lost == gained == 0:
        assert got["ci_lo_pp"] == got["ci_hi_pp"] == 0.0
    # the multinomial shortcut is the index bootstrap: its interval matches resampling images directly
    rng = np.random.default_rng(1)
    d = new.astype(float) - base
    idx = rng.integers(0, n, size=(20000, n))
    brute = np.percentile(100 * d[idx].mean(1), [2.5, 97.5])
    step = 100.0 / n
    assert abs(got["ci_lo_pp"] - brute[0]) <= step + 1e-9 and abs(got["ci_hi_pp"] - brute[1]) <= step + 1e-9
    assert PA.paired_delta(base, new) == got  # seeded


def test_paired_delta_known_values():
    base, new = _planted(359, 348, 3, 0)
    got = PA.paired_delta(base, new)
    assert got["mcnemar_p"] == pytest.approx(0.25)  # 2 · (1/2)^3
    base, new = _planted(400, 300, 20, 5)
    p = PA.paired_delta(base, new)["mcnemar_p"]
    assert p == pytest.approx(2 * sum(math.comb(25, i) for i in range(6)) / 2 ** 25)
    assert p < 0.01


@pytest.fixture
def env(analyze_env):
    return analyze_env


def _images(env, n=24):
    from clt_pipe.datasets.registry import open_dataset

    bb = env["bb"]
    ds = open_dataset("imagefolder", env["root"] / "data", "train")
    idx = np.arange(n)
    return ds, idx, torch.stack([bb.preprocess(ds.load_image(int(i))) for i in idx])


def test_position_means_are_the_per_position_means(env):
    store = env["store"]
    x, y = _all_rows(store)
    P = store.meta.model.n_positions
    mu, n_img = position_means(store, P, torch.device("cpu"), read_threads=1)
    assert n_img == 24 and mu.shape == (store.n_layers, P, store.d_model)
    pos = store.token_index.reshape(-1)
    for p in (0, 1, P - 1):
        np.testing.assert_allclose(mu[:, p].numpy(), y[pos == p].mean(0), rtol=1e-5, atol=1e-6)
    # the CLT's training store is missing: the analysed store itself, said so
    m = train_means(store, "/nonexistent/store.zarr", torch.device("cpu"), 0, read_threads=1)
    assert m.in_sample and "in-sample" in m.describe()
    torch.testing.assert_close(m.y, mu)


def test_closed_loop_paired_columns_on_a_planted_case(env):
    """Zero- and mean-ablating MLPs changes known images; closed_loop's lost / gained / p / interval are the
    paired statistics of the per-image outcomes computed here with plain forward hooks."""
    store, bb = env["store"], env["bb"]
    ds, idx, x = _images(env)
    labels = store.labels[idx]
    clf = torch.from_numpy(store.text_classifier("single")).float()
    scale = ZS.logit_scale(store)
    mu, _ = position_means(store, store.meta.model.n_positions, torch.device("cpu"), read_threads=1)
    L = store.n_layers
    plans = [SU.Plan("zero:0-5", "all", {j: "zero" for j in range(L)}),
             SU.Plan("mean:2-5", "all", {j: "mean" for j in range(2, L)}),
             SU.Plan("mean:cls:1", "cls", {1: "mean"})]
    want_emb = {
        "zero:0-5": _embed_with(bb, x, {j: torch.zeros_like for j in range(L)}),
        "mean:2-5": _embed_with(bb, x, {j: (lambda o, j=j: torch.zeros_like(o) + mu[j]) for j in range(2, L)}),
        "mean:cls:1": _embed_with(bb, x, {1: lambda o: torch.cat([mu[1, :1].expand(o.shape[0], 1, -1), o[:, 1:]],
                                                                 1)}),
    }
    base_ok = ZS.classify(SU.encode_images(bb, x, None, None), clf, scale).argmax(1).numpy() == labels
    res = SU.closed_loop(bb, None, plans, ds, idx, labels, clf.numpy(), scale, batch_size=8, means=mu)
    moved = 0
    for p in plans:
        ok = ZS.classify(want_emb[p.name], clf, scale).argmax(1).numpy() == labels
        r = res["plans"][p.name]
        lost, gained = int((base_ok & ~ok).sum()), int((~base_ok & ok).sum())
        moved += lost + gained
        assert (r["lost"], r["gained"]) == (lost, gained), p.name
        assert r["mcnemar_p"] == pytest.approx(_exact_mcnemar(lost, gained)), p.name
        assert r["delta_top1_pp"] == pytest.approx(100.0 * (gained - lost) / len(idx))
        assert r["ci_lo_pp"] <= r["delta_top1_pp"] <= r["ci_hi_pp"]
        assert "top5_lost" not in r  # 4 classes: top-5 cannot move
    assert moved > 0  # the planted ablations do change some images


def test_real_protocol_drops_features_from_the_real_model(env):
    """protocol real, features: the real model minus the top layer's live CLT writes; with an exact additive
    stub that is the replacement model without them; keep_topk replaces only the kept MLPs."""
    store, bb = env["store"], env["bb"]
    L = store.n_layers
    stub = AdditiveStub(bb)
    _, _, x = _images(env, 8)
    v = stub.v
    i = 2
    want = _embed_with(bb, x, {i: lambda o: torch.zeros_like(o) + v[:i, i].sum(0),
                               **{j: (lambda o, j=j: o - v[i, j]) for j in range(i + 1, L)}})
    plan = AB.drop_plan("d", "all", L, [i], "features", protocol="real")
    assert set(plan.replace.values()) == {"minus"}
    torch.testing.assert_close(SU.encode_images(bb, x, plan, stub), want, atol=2e-4, rtol=1e-4)
    keep = AB.keep_plan("k", "all", L, [1, 4], "features", {}, "real")
    assert plan.layers(L)["mlp_minus_features"] == ",".join(map(str, range(i, L)))
    assert keep.layers(L) == {"mlp_clt": "1,4", "mlp_real": "0,2,3,5", "mlp_mean": "", "mlp_zero": "",
                              "mlp_minus_features": "", "clt_sources": "0,1,2,3,4"}
    with pytest.raises(ConfigError, match="nothing to drop"):
        build(AnalyzeConfig, {"ablation_protocol": "real", "ablation_mode": "true"})


def test_ablation_columns_say_what_is_replaced():
    L, order = 6, [3, 5, 0, 1, 2, 4]
    plans = {p.name: p for p in AB.ablation_plans("all", order, L, 2, "features")}
    drop = plans["ablation:all:drop_top1"].layers(L)
    assert drop["mlp_clt"] == "0,1,2,3,4,5" and drop["clt_sources"] == "0,1,2,4,5"
    keep = plans["ablation:all:keep_top2"].layers(L)
    assert keep["mlp_clt"] == "0,1,2,3,4,5" and keep["clt_sources"] == "3,5"
    real = plans["ablation:all:keep_top2:real-mean"].layers(L)
    assert real["mlp_mean"] == "0,1,2,4" and real["mlp_real"] == "3,5"
    true = {p.meta["variant"] for p in AB.ablation_plans("all", order, L, 2, "true")}
    assert "real_top1" in true and "drop_top1" not in true  # mode true restores the real MLP


def test_unreachable_window_and_report_baselines(env, tmp_path):
    """A patch window at the last layer is not run and is marked; mean/zero rows and the mean predictor are
    in the report; retrieval uses every image as a query and matches a brute-force count."""
    store = env["store"]
    L = store.n_layers
    cfg = _cfg(env, out=str(tmp_path / "r"), only=["closedloop", "fidelity", "retrieval", "openloop"],
               windows=["1-5", "5-5"], window_tokens=["patches", "cls"], retrieval_k=3)
    run_analyze(cfg)
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    res = rep["results"]
    rows = res["closedloop"]["rows"]
    dead = [r for r in rows if r.get("reaches_readout") is False]
    assert [(r["tokens"], r["window"]) for r in dead] == [("patches", f"{L - 1}-{L - 1}")]
    assert "top1" not in dead[0] and "never reach" in dead[0]["note"]
    live = [(r["tokens"], r["window"], r["replaced_by"]) for r in rows if r.get("reaches_readout") is not False]
    assert len(live) == 3 * 3 and len(set(live)) == 9
    for r in rows:
        if r.get("reaches_readout") is not False:
            assert r["lost"] + r["gained"] <= r["n"] and 0 <= r["mcnemar_p"] <= 1
    ol = res["openloop"]["rows"]
    assert {r["replaced_by"] for r in ol} == set(ZS.REPLACED_BY.values())
    assert res["mean_baseline"]["in_sample"] is False  # the env's CLT names its training store: the same store
    html = (tmp_path / "r" / "report.html").read_text()
    for text in ("Mean baseline", "Paired comparison", "mcnemar_p", "train mean (mean-ablation)"):
        assert text in html, text

    # fidelity: the mean predictor's R², skill and centred cosine recomputed with numpy
    x, y = _all_rows(store)
    with torch.no_grad():
        recon = env["clt"](torch.from_numpy(x)).recon.double().numpy()
    mu, _ = position_means(store, store.meta.model.n_positions, torch.device("cpu"), read_threads=1)
    pos = store.token_index.reshape(-1)
    cls = pos == 0
    layer = 1
    yl, rl, ml = y[cls, layer].astype(np.float64), recon[cls, layer], mu[layer, 0].double().numpy()
    sst = ((yl - yl.mean(0)) ** 2).sum()
    sse, sse_m = ((rl - yl) ** 2).sum(), ((ml - yl) ** 2).sum()
    row = next(r for r in res["fidelity"]["per_layer"] if r["tokens"] == "cls" and r["layer"] == layer)
    assert row["r2_mean_pred"] == pytest.approx(1 - sse_m / sst, rel=1e-4, abs=1e-6)
    assert row["skill_vs_mean"] == pytest.approx(1 - sse / sse_m, rel=1e-4, abs=1e-6)
    a, b = rl - ml, yl - ml
    cc = ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean()
    assert row["cosine_centred"] == pytest.approx(cc, rel=1e-4, abs=1e-6)
    assert "never_fired_frac" in row and "dead_frac" not in row

    # retrieval: every image a query; layer-0 agreement of the raw input by brute force
    per = res["retrieval"]["per_layer"]
    assert res["retrieval"]["n_eval_queries"] == 24 and per[0]["n_queries"] == 24
    xi = x[cls, 0].astype(np.float64)
    xi /= np.linalg.norm(xi, axis=1, keepdims=True)
    sim = xi @ xi.T
    np.fill_diagonal(sim, -np.inf)
    nb = np.argsort(-sim, axis=1)[:, :3]
    lab = store.labels
    assert per[0]["input_label_agreement"] == pytest.approx((lab[nb] == lab[:, None]).mean())
    counts = np.bincount(lab)
    assert per[0]["chance"] == pytest.approx((counts * (counts - 1)).sum() / (24 * 23))
    assert 0 < per[0]["se"] < 0.2


def test_cascade_plot_leaves_out_what_cannot_move(tmp_path):
    from clt_pipe.analyze.plots import plot_cascade

    base = {"top1": 90.0, "top5": 100.0, "n": 100}
    rows = [{"mode": "closedloop", "tokens": "patches", "window": f"{a}-5", "first": a, "last": 5,
             "replaced_by": what, "top1": 90.0 - d, "top5": 100.0, "n": 100, "delta_top1_pp": -d,
             "ci_lo_pp": -d - 1, "ci_hi_pp": -d + 1, "lost": 1, "gained": 0, "mcnemar_p": 1.0}
            for a in (0, 3) for what, d in (("CLT", 1.0), ("zero (zero-ablation)", 30.0))]
    rows.append({"mode": "closedloop", "tokens": "patches", "window": "5-5", "first": 5, "last": 5,
                 "reaches_readout": False, "note": "x"})
    assert plot_cascade(tmp_path / "c.png", {"closedloop": {"baseline": base, "rows": rows}})
    from PIL import Image

    w1, h1 = Image.open(tmp_path / "c.png").size
    for r in rows:
        if "top1" in r:
            r.update(top5_lost=0, top5_gained=0, top5_ci_lo_pp=0.0, top5_ci_hi_pp=0.0, top5_mcnemar_p=1.0)
    plot_cascade(tmp_path / "c5.png", {"closedloop": {"baseline": base, "rows": rows}})
    w2, h2 = Image.open(tmp_path / "c5.png").size
    assert w1 == w2 and h2 > 1.6 * h1  # a top-5 row only where top-5 can move


def test_real_protocol_runs_and_the_report_says_so(env, tmp_path):
    cfg = _cfg(env, out=str(tmp_path / "r"), only=["ablation"], ablation_protocol="real", ablation_keep=2)
    summary = run_analyze(cfg)
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    abl = rep["results"]["ablation"]
    assert abl["protocol"] == "real" and summary["ablation_protocol"] == "real"
    L = env["store"].n_layers
    for t in ("cls", "all"):
        order = abl["ranking"][t]["order"]
        rows = {(r["variant"], r["model"]): r for r in abl["rows"] if r["tokens"] == t}
        keep = rows[("keep_top2", "CLT")]
        assert keep["mlp_clt"] == ",".join(map(str, sorted(order[:2])))
        assert keep["mlp_real"] == ",".join(map(str, sorted(order[2:])))
        drop = rows[("drop_top1", "CLT")]
        assert drop["mlp_minus_features"] == ",".join(map(str, range(order[0], L))) and drop["mlp_clt"] == ""
        assert rows[("drop_top1", "real, zero-ablated")]["mlp_zero"] == str(order[0])
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Ablation protocol:</strong> real" in html


def test_demo_figures_script_reads_what_the_report_holds(env, full_report):
    """The figures the docs quote come from clt_pipe.demo.figures: its full-reconstruction R² is the report's."""
    from clt_pipe.demo.figures import report_figures, truncated_r2

    cfg, _ = full_report
    rep = json.loads((Path(cfg.out) / "report.json").read_text())
    t = truncated_r2(env["store"], env["clt"], layer=1)
    row = next(r for r in rep["results"]["fidelity"]["per_layer"] if r["tokens"] == "cls" and r["layer"] == 1)
    assert t["full_r2"] == pytest.approx(row["r2"], rel=1e-4, abs=1e-6) and t["n"] == 24
    assert t["window_r2"] != pytest.approx(t["full_r2"], abs=1e-3)  # layer 0's writes are missing
    lines = report_figures(Path(cfg.out) / "report.json")
    assert any("lost" in ln and "McNemar p" in ln for ln in lines)
    assert any(ln.startswith("retrieval layer 0") and "raw MLP input" in ln for ln in lines)
