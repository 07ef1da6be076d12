"""clt_pipe.analyze: metric identities, closed/open-loop substitution identities, full report, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clt_pipe.analyze import attribution as AT
from clt_pipe.analyze import substitution as SU
from clt_pipe.analyze import zeroshot as ZS
from clt_pipe.analyze.run import run_analyze
from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.config import AnalyzeConfig, build
from clt_pipe.errors import CltPipeError, ConfigError, StoreError
from clt_pipe.clt.rundir import save_fitted
from tests.conftest import ANALYZE_N_FEATURES as N_FEATURES
from tests.conftest import analyze_config as _cfg


@pytest.fixture
def env(analyze_env):
    return analyze_env


def _all_rows(store):
    xs, ys = [], []
    for c in range(store.layout.n_chunks):
        x, y = store.read_chunk(c)
        xs.append(store.decode(x))
        ys.append(store.decode(y))
    return np.concatenate(xs), np.concatenate(ys)


class MLPStub:
    """A 'CLT' whose reconstruction is exactly the model's own MLP: z_l = LN2 output, decode_to = mlp_l(z_l)."""

    def __init__(self, bb):
        self.blocks = bb.blocks

    def encode_layer(self, x, layer):
        return x

    def decode_to(self, zs, target):
        h = zs[target]
        for sub in self.blocks[target].mlp:  # the submodules, not mlp(): its forward hook is the substitution
            h = sub(h)
        return h


class TrueOutputStub:
    """Open-loop 'CLT' reproducing the cached MLP outputs exactly: codes are the stored targets, looked up by input."""

    def __init__(self, store):
        x, y = _all_rows(store)
        self.table = {x[i].tobytes(): torch.from_numpy(y[i]) for i in range(x.shape[0])}

    def encode(self, x):
        return torch.stack([self.table[r.numpy().tobytes()] for r in x])  # [n, L, d]: z_l = y_l

    def decode_to(self, zs, target):
        return zs[target]


def test_attribution_columns_sum_to_one(env):
    clt = env["clt"]
    x = torch.randn(7, clt.spec.n_layers, clt.spec.d_model) * 3
    ratio, ok = AT.token_ratios(clt, x)
    assert ok.all()
    torch.testing.assert_close(ratio.sum(1), torch.ones(7, clt.spec.n_layers), atol=1e-4, rtol=0)
    L = clt.spec.n_layers
    assert float(ratio[:, torch.tril_indices(L, L, -1)[0], torch.tril_indices(L, L, -1)[1]].abs().max()) == 0.0
    res = AT.attribution(env["store"], clt, torch.device("cpu"), read_threads=1)
    for t in ("cls", "patches", "all"):
        np.testing.assert_allclose(res[t]["matrix"].sum(0), 1.0, atol=1e-4)
        assert np.allclose(np.tril(res[t]["matrix"], -1), 0)
    assert res["cls"]["n_tokens"] == 24 and res["patches"]["n_tokens"] == 24 * 16


@torch.no_grad()
def test_baseline_matches_model_encode(env):
    store, bb, data = env["store"], env["bb"], env["data"]
    from PIL import Image

    names = store.class_names
    txt = bb.model.encode_text(bb.tokenizer([f"a photo of a {c}." for c in names])).float()
    txt = txt / txt.norm(dim=-1, keepdim=True)
    imgs = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in data["paths"]])
    emb = bb.model.encode_image(imgs).float()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    logits = bb.model.logit_scale.exp() * emb @ txt.T
    want = 100.0 * float((logits.argmax(1).numpy() == np.array(data["labels"])).mean())
    base = ZS.baseline(store, "single")
    assert base["n"] == 24
    assert base["top1"] == pytest.approx(want)
    np.testing.assert_array_equal(base["predictions"], logits.argmax(1).numpy())
    assert base["top5"] == 100.0  # 4 classes: top-min(5, C) always hits


def test_openloop_exact_clt_equals_baseline(env):
    store = env["store"]
    stub = TrueOutputStub(store)
    windows = ZS.parse_windows(["0-11", "3-11", "7-11", "10-11"], store.n_layers)
    acc = ZS.OpenLoopAccumulator(store, stub, windows, "single", False, torch.device("cpu"))
    from clt_pipe.analyze.stream import iter_chunks

    for b in iter_chunks(store, torch.device("cpu"), read_threads=1):
        acc.update(b)
    res = acc.result()
    base = res["baseline_resid"]
    assert base["top1"] == pytest.approx(ZS.baseline(store, "single")["top1"])
    for r in res["rows"]:
        assert r["top1"] == base["top1"] and r["top5"] == base["top5"]
        assert r["cross_entropy"] == pytest.approx(base["cross_entropy"], abs=1e-6)
    # a real (random) CLT moves the open-loop logits
    real = ZS.openloop_substitution(store, env["clt"], ["0-11"], "single", read_threads=1)
    assert real["rows"][0]["cross_entropy"] != pytest.approx(base["cross_entropy"], abs=1e-4)


def test_parse_windows_rescales_for_shallow_models():
    w = ZS.parse_windows(["0-11", "3-11", "7-11", "10-11"], 6)
    assert [x["name"] for x in w] == ["0-5", "1-5", "3-5", "4-5"] and all(x["rescaled"] for x in w)
    w12 = ZS.parse_windows(["0-11", "10-11"], 12)
    assert [(x["first"], x["last"], x["rescaled"]) for x in w12] == [(0, 11, False), (10, 11, False)]


def test_closedloop_identity_stub_and_real_clt(env):
    store, bb = env["store"], env["bb"]
    from clt_pipe.datasets.registry import open_dataset

    ds = open_dataset("imagefolder", env["root"] / "data", "train")
    idx = np.arange(24)
    clf = store.text_classifier("single")
    scale = ZS.logit_scale(store)
    plans = [SU.window_plan(t, a, 5, False) for t in ("cls", "patches", "all") for a in (0, 3)]
    res = SU.closed_loop(bb, MLPStub(bb), plans, ds, idx, store.labels[idx], clf, scale, batch_size=8)
    base = res["baseline"]
    assert base["top1"] == pytest.approx(ZS.baseline(store, "single")["top1"])
    for p in plans:
        r = res["plans"][p.name]
        assert r["top1"] == base["top1"] and r["agree_top1"] == 1.0
        assert r["cross_entropy"] == pytest.approx(base["cross_entropy"], abs=1e-4)
    # the real random CLT changes the logits, and more so when more layers are substituted
    x = torch.stack([bb.preprocess(ds.load_image(i)) for i in range(8)])
    e0 = SU.encode_images(bb, x, None, env["clt"])
    e_all = SU.encode_images(bb, x, SU.window_plan("all", 0, 5, False), env["clt"])
    e_cls = SU.encode_images(bb, x, SU.window_plan("cls", 4, 5, False), env["clt"])
    assert not torch.allclose(e0, e_all, atol=1e-3)
    assert not torch.allclose(e0, e_cls, atol=1e-4)
    assert (e_all - e0).norm() > (e_cls - e0).norm()
    # zero ablation of one layer's MLP for all tokens equals running the model with that MLP's output zeroed
    zero = SU.Plan("z", "all", {2: "zero"})
    handle = bb.blocks[2].mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        with torch.inference_mode():
            want = bb.model.encode_image(x).float()
    finally:
        handle.remove()
    torch.testing.assert_close(SU.encode_images(bb, x, zero, None), want)


def test_run_analyze_full_report(env, full_report):
    cfg, summary = full_report
    out = Path(cfg.out)
    rep = json.loads((out / "report.json").read_text())
    for name in ("fidelity", "fidelity_aggregate", "attribution", "substitution", "ablation", "retrieval"):
        assert (out / f"{name}.parquet").is_file(), name
    for name in ("attribution.png", "cascade.png", "fidelity.png", "ablation.png"):
        assert (out / name).stat().st_size > 5000, name
    assert len(list(out.glob("retrieval_q*.png"))) == 3
    html_text = (out / "report.html").read_text()
    assert html_text.count("data:image/png;base64,") >= 7 and "<table>" in html_text
    assert rep["identity"]["store"]["fingerprint"] == env["store"].meta.fingerprint
    assert rep["settings"]["ablation_keep"] == 2
    res = rep["results"]

    # fidelity: recompute R², MSE, cosine for layer 2, all tokens, with numpy from the raw store arrays
    store, clt = env["store"], env["clt"]
    x, y = _all_rows(store)
    with torch.no_grad():
        recon = clt(torch.from_numpy(x)).recon.double().numpy()
    layer = 2
    yl, rl = y[:, layer].astype(np.float64), recon[:, layer]
    sse = ((rl - yl) ** 2).sum()
    sst = ((yl - yl.mean(0)) ** 2).sum()
    row = next(r for r in res["fidelity"]["per_layer"] if r["tokens"] == "all" and r["layer"] == layer)
    assert row["n_tokens"] == 24 * 17
    assert row["r2"] == pytest.approx(1 - sse / sst, rel=1e-5, abs=1e-6)
    assert row["mse"] == pytest.approx(sse / yl.size, rel=1e-5)
    cos = (rl * yl).sum(1) / np.linalg.norm(rl, axis=1) / np.linalg.norm(yl, axis=1)
    assert row["cosine"] == pytest.approx(cos.mean(), rel=1e-5, abs=1e-6)
    assert row["l0"] == pytest.approx(8.0, abs=1e-6) or row["l0"] < 8.0  # ReLU-TopK: at most k fire
    cls_row = next(r for r in res["fidelity"]["per_layer"] if r["tokens"] == "cls" and r["layer"] == layer)
    ycls, rcls = yl[::17], rl[::17]
    assert cls_row["r2"] == pytest.approx(1 - ((rcls - ycls) ** 2).sum() / ((ycls - ycls.mean(0)) ** 2).sum(),
                                          rel=1e-5, abs=1e-6)
    agg = next(a for a in res["fidelity"]["aggregate"] if a["tokens"] == "all")
    assert agg["r2"] == pytest.approx(np.mean([r["r2"] for r in res["fidelity"]["per_layer"]
                                               if r["tokens"] == "all"]))
    tbl = pq.read_table(out / "fidelity.parquet").to_pylist()
    assert len(tbl) == 3 * store.n_layers

    # baseline accuracy recomputed with numpy
    emb = store.per_image("embedding")
    clf = store.text_classifier("single")
    pred = ((emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ clf.T).argmax(1)
    assert res["zeroshot"]["top1"] == pytest.approx(100 * (pred == store.labels).mean())
    assert summary["baseline_top1"] == pytest.approx(round(res["zeroshot"]["top1"], 2))

    # attribution columns sum to 1 in the report too
    for t in ("cls", "patches", "all"):
        np.testing.assert_allclose(np.array(res["attribution"][t]["matrix"]).sum(0), 1.0, atol=1e-4)

    # substitution rows: open-loop CLS windows (rescaled), closed-loop cls+all windows, baselines agree
    sub = pq.read_table(out / "substitution.parquet").to_pylist()
    modes = [r["mode"] for r in sub]
    # each window three times: the CLT, mean- and zero-ablation of the same layers
    assert modes.count("openloop") == 4 * 3 and modes.count("closedloop") == 8 * 3
    assert all({"lost", "gained", "mcnemar_p", "ci_lo_pp", "ci_hi_pp"} <= set(r) for r in sub if "window" in r
               and r["window"])
    assert res["closedloop_baseline"]["top1"] == pytest.approx(res["zeroshot"]["top1"])
    assert any("rescaled" in n for n in res["notes"])

    # ablation: the ranking follows the residual shares (they sum to 1); keep_top2 keeps exactly those layers
    abl = res["ablation"]
    share = np.array(res["attribution"]["cls"]["residual_share"])
    assert share.sum() == pytest.approx(1.0, abs=1e-4)
    order = abl["ranking"]["cls"]["order"]
    assert order[0] == int(np.argmax(share))
    clt_rows = [r for r in abl["rows"] if r["model"] == "CLT"]
    keep = next(r for r in clt_rows if r["tokens"] == "cls" and r["variant"] == "keep_top2")
    assert keep["clt_sources"] == ",".join(map(str, sorted(order[:2])))
    drop = next(r for r in clt_rows if r["tokens"] == "cls" and r["variant"] == "drop_top1")
    assert drop["dropped"] == str(order[0]) and str(order[0]) not in drop["clt_sources"].split(",")
    assert drop["mlp_clt"] == ",".join(map(str, range(store.n_layers)))  # features mode: every MLP replaced
    real = {(r["variant"], r["model"]) for r in abl["rows"] if r["tokens"] == "cls" and r["model"] != "CLT"}
    assert real == {(v, f"real, {m}-ablated") for v in ("drop_top1", "keep_top2") for m in ("mean", "zero")}
    # the report says which substitution rule, ranking and drop definition ran
    assert res["substitution_rule"]["name"] == "full" and summary["substitution_rule"] == "full"
    assert abl["rank"] == "attribution" and abl["mode"] == "features" and abl["protocol"] == "replacement"
    for text in ("Substitution rule", "full reconstruction", "Ablation ranking", "Ablation drop",
                 "Ablation protocol"):
        assert text in html_text, text

    # retrieval: neighbours exclude the query; label agreement consistent with the table
    rrows = res["retrieval"]["rows"]
    assert all(r["neighbour"] != r["query"] for r in rrows)
    assert {r["query"] for r in rrows} == set(res["retrieval"]["queries"]) and len(res["retrieval"]["queries"]) == 3
    assert res["retrieval"]["per_layer"][0]["n_queries"] == 24  # agreement: every image is a query
    assert res["retrieval"]["grids"] == "images"


def test_clt_for_another_model_is_refused(env, tmp_path):
    store = env["store"]
    clt = CrossLayerTranscoder(CLTSpec(store.n_layers, 32, 64, "relu_topk", 4))
    run = tmp_path / "other"
    other = dict(store.model, d_model=32, name="other-clip")
    save_fitted(run, clt, {"store": {"model": other, "n_layers": store.n_layers, "d_model": 32}})
    with pytest.raises(CltPipeError, match=r"CLT trained on other-clip \(6 layers × 32.*but store holds"):
        run_analyze(_cfg(env, clt=str(run), only=["fidelity"], out=str(tmp_path / "r")))
    clt6 = CrossLayerTranscoder(CLTSpec(store.n_layers, store.d_model, 64, "relu_topk", 4))
    run2 = tmp_path / "other-weights"
    save_fitted(run2, clt6, {"store": {"model": dict(store.model, weights_sha256="0" * 64)}})
    with pytest.raises(CltPipeError, match="CLT trained on"):
        run_analyze(_cfg(env, clt=str(run2), only=["fidelity"], out=str(tmp_path / "r")))


def test_incomplete_store_is_refused(env, tmp_path):
    copy = tmp_path / "incomplete.zarr"
    shutil.copytree(env["store_url"], copy)
    (copy / "COMPLETE.json").unlink()
    with pytest.raises(StoreError, match="incomplete"):
        run_analyze(_cfg(env, store=str(copy), only=["fidelity"], out=str(tmp_path / "r")))


def test_closedloop_needs_data_root(env, tmp_path):
    with pytest.raises(CltPipeError, match="--data-root"):
        run_analyze(_cfg(env, data_root="", only=["closedloop"], out=str(tmp_path / "r")))
    with pytest.raises(CltPipeError, match="--data-root"):
        run_analyze(_cfg(env, data_root="", only=["ablation"], out=str(tmp_path / "r")))


def test_unknown_part_is_a_config_error():
    with pytest.raises(ConfigError, match="only"):
        build(AnalyzeConfig, {"only": ["nope"]})


def _capture_mlp_io(bb):
    """Hooks recording every block's LN2 output and (possibly substituted) MLP output; returns (dicts, handles)."""
    ln2, mlp, handles = {}, {}, []
    for layer, block in enumerate(bb.blocks):
        handles.append(block.ln_2.register_forward_hook(lambda m, i, o, l=layer: ln2.__setitem__(l, o.detach())))
        handles.append(block.mlp.register_forward_hook(lambda m, i, o, l=layer: mlp.__setitem__(l, o.detach())))
    return ln2, mlp, handles


def test_default_substitution_is_the_clt_reconstruction(env):
    """Default rule: a substituted layer's MLP output is the CLT's own reconstruction from all sources 0..j."""
    store, bb, clt = env["store"], env["bb"], env["clt"]
    from clt_pipe.datasets.registry import open_dataset

    ds = open_dataset("imagefolder", env["root"] / "data", "train")
    x = torch.stack([bb.preprocess(ds.load_image(i)) for i in range(4)])
    assert AnalyzeConfig().sources_before_window is True
    first, last = 2, store.n_layers - 1
    for default_rule, want_exact in ((AnalyzeConfig().sources_before_window, True), (False, False)):
        plan = SU.window_plan("all", first, last, default_rule)
        with torch.inference_mode(), SU.SubstitutionHooks(bb, clt, plan):
            ln2, mlp, handles = _capture_mlp_io(bb)  # registered after the substitution: sees its output
            try:
                bb.model.encode_image(x)
            finally:
                for h in handles:
                    h.remove()
        bm = (lambda t: t) if getattr(bb.visual.transformer, "batch_first", True) else (lambda t: t.transpose(0, 1))
        live = torch.stack([bm(ln2[j]).reshape(-1, store.d_model) for j in range(store.n_layers)], 1)
        with torch.no_grad():
            recon = clt(live.float()).recon
        for j in range(first, last + 1):
            got = bm(mlp[j]).reshape(-1, store.d_model)
            close = torch.allclose(got, recon[:, j], atol=1e-4, rtol=1e-4)
            assert close == want_exact, (default_rule, j)  # in-window only is a truncated ŷ_j


class AdditiveStub:
    """A synthetic CLT with exact, additive cross-layer writes whose ablations have a known effect.

    Codes are the LN2 outputs. Source i writes a constant v[i, j] into every later target j, and its own target
    gets mlp_i(z_i) − Σ_{k<i} v[k, i], so with every source the reconstruction is exactly the model's MLP.
    """

    def __init__(self, bb, seed=0):
        self.blocks = bb.blocks
        L, d = len(bb.blocks), bb.blocks[0].mlp[-1].out_features
        self.v = torch.randn(L, L, d, generator=torch.Generator().manual_seed(seed)) * 0.3

    def encode_layer(self, x, layer):
        return x

    def _mlp(self, j, h):
        for sub in self.blocks[j].mlp:
            h = sub(h)
        return h

    def decode_to(self, zs, j):
        out = None
        for i, z in enumerate(zs[:j + 1]):
            if z is None:
                continue
            part = self._mlp(j, z) - self.v[:j, j].sum(0) if i == j else self.v[i, j].expand(z.shape[0], -1)
            out = part if out is None else out + part
        return out


def _embed_with(bb, x, edits):
    """Embeddings of the unmodified model with each block's MLP output passed through edits[j](out)."""
    handles = [bb.blocks[j].mlp.register_forward_hook(lambda m, i, o, f=f: f(o)) for j, f in edits.items()]
    try:
        return SU.encode_images(bb, x, None, None)
    finally:
        for h in handles:
            h.remove()


def test_drop_layer_is_the_same_operation_for_every_layer(env):
    from clt_pipe.analyze import ablation as AB
    from clt_pipe.datasets.registry import open_dataset

    store, bb = env["store"], env["bb"]
    L = store.n_layers
    stub = AdditiveStub(bb)
    ds = open_dataset("imagefolder", env["root"] / "data", "train")
    idx = np.arange(24)
    x = torch.stack([bb.preprocess(ds.load_image(int(i))) for i in idx])
    base = SU.encode_images(bb, x, None, None)
    torch.testing.assert_close(SU.encode_images(bb, x, AB.drop_plan("full", "all", L, [], "features"), stub), base,
                               atol=2e-4, rtol=1e-4)
    clf = torch.from_numpy(store.text_classifier("single")).float()
    scale = ZS.logit_scale(store)
    labels = store.labels[idx]
    plans, expected_top1 = [], {}
    for i in range(L):
        v = stub.v
        expected = {
            # features: source i gone everywhere: its own MLP keeps only earlier sources' writes,
            # later ones lose v[i, j]
            "features": _embed_with(bb, x, {i: lambda o, i=i: torch.zeros_like(o) + v[:i, i].sum(0),
                                            **{j: (lambda o, i=i, j=j: o - v[i, j]) for j in range(i + 1, L)}}),
            "zero": _embed_with(bb, x, {i: torch.zeros_like}),
            "true": base,
        }
        for mode, want in expected.items():
            plan = AB.drop_plan(f"drop{i}:{mode}", "all", L, [i], mode)
            torch.testing.assert_close(SU.encode_images(bb, x, plan, stub), want, atol=2e-4, rtol=1e-4,
                                       msg=lambda m, i=i, mode=mode: f"drop layer {i} ({mode}): {m}")
            plans.append(plan)
            pred = ZS.classify(want, clf, scale).argmax(1).numpy()
            expected_top1[plan.name] = 100.0 * float((pred == labels).mean())
    # and the accuracy change closed_loop reports is the one those edited models give
    res = SU.closed_loop(bb, stub, plans, ds, idx, labels, clf.numpy(), scale, batch_size=8)
    for p in plans:
        assert res["plans"][p.name]["top1"] == pytest.approx(expected_top1[p.name]), p.name


def test_ablation_ranking_finds_the_dominant_middle_layer(env):
    """A CLT whose layer-3 features write 30× more into the last layer: the ranking must put layer 3 first."""
    from clt_pipe.analyze import ablation as AB
    from clt_pipe.analyze.stream import ChunkBatch

    store = env["store"]
    L, d, m = store.n_layers, store.d_model, 3
    torch.manual_seed(3)
    clt = CrossLayerTranscoder(CLTSpec(L, d, N_FEATURES, "relu_topk", 8))
    with torch.no_grad():
        clt.W_dec[m][:, L - 1 - m] *= 30.0
    n_img, per = 16, 5
    x = torch.randn(n_img * per, L, d) * 3
    pos = np.tile(np.arange(per), n_img)
    batch = ChunkBatch(0, x, torch.zeros_like(x), pos, np.repeat(np.arange(n_img), per), np.ones(n_img * per, bool))
    acc = AT.AttributionAccumulator(clt)
    acc.update(batch)
    att = acc.result()
    for t in ("cls", "all"):
        assert att[t]["residual_share"].sum() == pytest.approx(1.0, abs=1e-6)
        for rule in ("attribution", "final_layer"):
            order, scores = AB.rank_layers(rule, t, att, None, L)
            assert order[0] == m, (t, rule, scores)
    # the old score (absolute C_proj row sum) ranks layer 0 above it: row 0 has the most entries and C[0→0] = 1
    old = np.abs(att["all"]["matrix"]).sum(1)
    assert int(np.argmax(old)) != m
