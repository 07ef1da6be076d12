"""`clt-pipe graph`: the replacement model is exact, a planted graph is found, the files read back in
circuit-tracer, the page renders."""

import json

import pytest
import torch

from tests.conftest import assert_one_line_error, run_cli

COMPLETENESS_TOL = 1e-4


def _graph_of(bb, clt, image, n_classes=10, seed=0, **kw):
    from clt_pipe.analyze.graph.attribution import build_graph
    from clt_pipe.analyze.graph.replacement import Replacement, capture

    cap, W = capture(bb.visual, image)
    g = torch.Generator().manual_seed(seed)
    clf = torch.nn.functional.normalize(torch.randn(n_classes, cap.embedding.shape[0], generator=g), dim=-1)
    rep = Replacement(cap, W, clf, 100.0)
    return rep, build_graph(rep, clt, [f"c{i}" for i in range(n_classes)], **kw)


def _random_clt(n_layers, d, n_features, k, seed=1, b_dec=False):
    from clt_pipe.clt.model import CrossLayerTranscoder
    from clt_pipe.clt.spec import CLTSpec

    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTSpec(n_layers, d, n_features, "relu_topk", k, dec_bias=b_dec)).eval()
    with torch.no_grad():  # non-trivial standardisation and bias, as a fitted CLT has
        clt.set_standardization(torch.randn(n_layers, d) * 0.1, torch.rand(n_layers) + 0.5, torch.rand(n_layers) + 0.5)
        if b_dec:
            clt.b_dec.normal_(0, 0.1)
    return clt


def test_capture_is_open_clips_forward(analyze_env):
    from clt_pipe.analyze.graph.replacement import capture

    bb = analyze_env["bb"]
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3))
    cap, _ = capture(bb.visual, image)
    with torch.no_grad():
        ref = bb.model.encode_image(image[None])[0]
    assert torch.allclose(cap.embedding, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b_dec", [False, True])
def test_tiny_clip_graph_is_complete_and_replays_the_logits(analyze_env, b_dec):
    from clt_pipe.analyze.graph.attribution import replacement_logits

    bb = analyze_env["bb"]
    clt = _random_clt(6, 64, 128, 8, b_dec=b_dec)
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(4))
    rep, g = _graph_of(bb, clt, image, batch_size=37)  # batches that split layers and the logit rows
    assert g.n_features == 17 * 6 * 8  # ReLU-TopK of random directions: every kept slot fires
    assert g.completeness_error() <= COMPLETENESS_TOL
    # the residual is small against the inputs' own scale, feature and logit rows alike
    res = g.completeness_residual()
    assert res[:g.n_features].max() < 1e-4 * g.inputs[:g.n_features].abs().max()
    assert res[g.n_features:].max() < 1e-4 * g.inputs[g.logit_start:].abs().max()
    # the edges are not trivially zero: the inputs are mostly explained by them, not by the constants
    rows = g.target_rows()
    assert (g.adjacency[rows].sum(1) - g.inputs[rows]).abs().mean() < (g.inputs[rows]).abs().mean()
    with torch.no_grad():
        real = 100.0 * torch.nn.functional.normalize(bb.model.encode_image(image[None]), dim=-1)[0] @ rep.clf.T
    assert torch.allclose(replacement_logits(rep, g, clt), real, atol=1e-4)
    assert torch.allclose(g.logits, real, atol=1e-4)
    # a DAG: nothing at layer l feeds a feature at layer ≤ l
    L = g.active_features[:, 0]
    ff = g.adjacency[:g.n_features, :g.n_features]
    assert not ff[L[:, None] <= L[None, :]].any()


def test_batch_size_does_not_change_the_graph(analyze_env):
    bb = analyze_env["bb"]
    clt = _random_clt(6, 64, 128, 4)
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5))
    _, a = _graph_of(bb, clt, image, batch_size=512)
    _, b = _graph_of(bb, clt, image, batch_size=7)
    assert torch.allclose(a.adjacency, b.adjacency, atol=1e-6)


def test_vit_b32_shaped_random_model_is_complete(tmp_path):
    """open_clip's ViT-B-32 geometry (width 768, 12 heads, 224 px, 32 px patches: 50 positions), random init;
    two layers instead of twelve to stay fast on a CPU (the GPU benchmark runs all twelve)."""
    import open_clip

    from clt_pipe.backbone.loading import load_backbone

    cfg = open_clip.get_model_config("ViT-B-32")
    cfg["vision_cfg"]["layers"] = 2
    cfg["text_cfg"]["layers"] = 1
    path = tmp_path / "vit-b-32-2layers.json"
    path.write_text(json.dumps(cfg))
    bb = load_backbone(str(path), "none", "cpu")
    clt = _random_clt(2, 768, 128, 2, b_dec=True)
    image = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(6))
    _, g = _graph_of(bb, clt, image, n_classes=100)
    assert g.n_pos == 50 and g.n_features == 50 * 2 * 2
    assert g.completeness_error() <= COMPLETENESS_TOL


def test_planted_graph_is_found_exactly(analyze_env):
    """Attention writes nothing (out_proj zeroed) and LayerNorms are plain, so positions never mix. Feature A
    (layer 0) fires everywhere and writes c·u1 into layer 0; feature B (layer 1) reads u1; nothing else fires.
    Then the only feature edges are A(0,p) → B(1,p) = a_A · c / σ₂(1,p), and an embedding reaches B only at
    its own position, with ⟨emb_p, u1⟩ / σ₂(1,p)."""
    import copy

    bb = copy.deepcopy(analyze_env["bb"])
    with torch.no_grad():
        for blk in bb.blocks:
            blk.attn.out_proj.weight.zero_()
            blk.attn.out_proj.bias.zero_()
            for ln in (blk.ln_1, blk.ln_2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
    L, d, F, c = 6, 64, 4, 0.7
    g = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
    u = q.T - q.T.mean(1, keepdim=True)  # zero-mean directions: LayerNorm's centring leaves them alone
    u = u / u.norm(dim=1, keepdim=True)
    from clt_pipe.clt.model import CrossLayerTranscoder
    from clt_pipe.clt.spec import CLTSpec

    clt = CrossLayerTranscoder(CLTSpec(L, d, F, "relu_topk", 1)).eval()
    with torch.no_grad():
        clt.W_enc.zero_()
        clt.b_enc.fill_(-1.0)
        for w in clt.W_dec:
            w.zero_()
        clt.W_enc[0][:, 0], clt.b_enc[0, 0] = u[0], 5.0
        clt.W_enc[1][:, 0], clt.b_enc[1, 0] = u[1], 5.0
        clt.W_dec[0][0, 0] = c * u[1]
        clt.W_dec[1][0, 0] = c * u[2]
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(8))
    rep, gr = _graph_of(bb, clt, image)
    P = gr.n_pos
    assert gr.active_features.tolist() == [[0, p, 0] for p in range(P)] + [[1, p, 0] for p in range(P)]
    sigma2 = rep.cap.sigma2[1, :, 0]
    a_A = gr.activations[:P]
    expected = torch.zeros(2 * P, 2 * P)
    expected[P + torch.arange(P), torch.arange(P)] = a_A * c / sigma2
    assert torch.allclose(gr.adjacency[:2 * P, :2 * P], expected, atol=1e-5, rtol=1e-4)
    emb_to_b = gr.adjacency[P:2 * P, gr.token_start:gr.logit_start]
    assert torch.allclose(emb_to_b, torch.diag(rep.cap.emb @ u[1] / sigma2), atol=1e-5, rtol=1e-4)
    assert gr.completeness_error() <= COMPLETENESS_TOL


def test_pruning_is_circuit_tracers(analyze_env):
    pytest.importorskip("circuit_tracer")
    from circuit_tracer.graph import compute_influence, normalize_matrix

    from clt_pipe.analyze.graph import prune as PR

    bb = analyze_env["bb"]
    clt = _random_clt(6, 64, 128, 4)
    _, g = _graph_of(bb, clt, torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(9)))
    w = torch.zeros(g.n_nodes)
    w[g.logit_start:] = g.target_weights
    ours = PR.compute_influence(PR.normalize_matrix(g.adjacency), w)
    assert torch.allclose(ours, compute_influence(normalize_matrix(g.adjacency), w))


def test_graph_command_writes_circuit_tracer_files_and_page(analyze_env, tmp_path, capsys, monkeypatch):
    from clt_pipe.analyze.graph import prune as PR

    monkeypatch.setattr(PR, "ROW_BLOCK", 100)  # the scores read the adjacency in several row blocks
    out = tmp_path / "g"
    code, stdout, err = run_cli(capsys, monkeypatch, [
        "graph", "--store", analyze_env["store_url"], "--clt", str(analyze_env["run_dir"]), "--out", str(out),
        "--image", "3", "--device", "cpu", "--batch-size", "64", "--top-images", "2"])
    assert code == 0, err
    assert "completeness error" in stdout
    summary = json.loads((out / "graph.json").read_text())
    assert summary["completeness error"] <= COMPLETENESS_TOL
    assert summary["replacement logits max |diff| vs encode_image"] < 1e-3
    assert (out / "graph.html").is_file() and (out / "graph-img" / "total.png").is_file()
    html = (out / "graph.html").read_text()
    assert "atlas/features/" in html  # kept features link to their atlas pages
    ct = pytest.importorskip("circuit_tracer")
    from circuit_tracer.frontend.graph_models import Model
    from circuit_tracer.graph import Graph, prune_graph

    del ct
    graph = Graph.from_pt(str(out / "circuit-tracer" / "graph.pt"))
    assert graph.adjacency_matrix.shape[0] == summary["nodes"]
    assert graph.active_features.shape[0] == summary["feature nodes"]
    theirs = prune_graph(graph)
    ours = PR.prune(graph.adjacency_matrix, graph.logit_probabilities, len(graph.selected_features),
                    len(graph.input_tokens))
    assert torch.equal(theirs.node_mask, ours.node_mask) and torch.equal(theirs.edge_mask, ours.edge_mask)
    assert int(ours.node_mask.sum()) == summary["kept nodes"]
    model = Model.model_validate_json((out / "circuit-tracer" / "graph_files" / "image-3.json").read_text())
    kinds = {n.feature_type for n in model.nodes}
    assert {"embedding", "logit"} <= kinds and model.links
    assert model.metadata.prompt_tokens[0] == "CLS"
    meta = json.loads((out / "circuit-tracer" / "graph_files" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in meta["graphs"]] == ["image-3"]
    from circuit_tracer.graph import compute_graph_scores

    replacement, completeness = compute_graph_scores(graph)
    assert 0.0 < summary["replacement score"] < 1.0
    assert summary["replacement score"] == pytest.approx(float(replacement), rel=1e-5)
    assert summary["completeness score"] == pytest.approx(float(completeness), rel=1e-5)


def test_graph_page_renders(analyze_env, tmp_path_factory, page_checker):
    from clt_pipe.config import GraphConfig, build
    from clt_pipe.analyze.graph.run import run_graph

    out = tmp_path_factory.mktemp("graph-page")
    cfg = build(GraphConfig, {"store": analyze_env["store_url"], "clt": str(analyze_env["run_dir"]), "out": str(out),
                              "image": "5", "device": "cpu", "top_images": 2, "target": "dog", "versus": "cat"})
    summary = run_graph(cfg)
    assert summary["target"] == "dog − cat"
    assert page_checker.problems(out / "graph.html") == []
    feature_pages = list((out / "atlas" / "features").glob("*.html"))
    assert feature_pages and page_checker.problems(feature_pages[0]) == []


@pytest.mark.parametrize("args, needle", [
    (["--image", "999"], "outside the store"),
    (["--image", "/nonexistent.png"], "neither a store image index"),
    (["--target", "zebra"], "not a class"),
    (["--versus", "cat"], "needs --target"),
    (["--node-threshold", "1.5"], "node_threshold"),
])
def test_bad_input_is_one_error_line(analyze_env, tmp_path, capsys, monkeypatch, args, needle):
    code, _, err = run_cli(capsys, monkeypatch, [
        "graph", "--store", analyze_env["store_url"], "--clt", str(analyze_env["run_dir"]),
        "--out", str(tmp_path / "g"), "--device", "cpu", *args])
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "g" / "graph.html").exists()



def test_an_image_file_and_an_atlas_written_by_another_run(analyze_env, tmp_path):
    """The image given as a file (here the store's image 1 itself: the same logits as by index); an atlas already
    in OUT (an analyze report's) is kept as it is."""
    from clt_pipe.config import GraphConfig, build
    from clt_pipe.analyze.graph.run import run_graph

    out = tmp_path / "report"
    (out / "atlas" / "features").mkdir(parents=True)
    (out / "atlas" / "index.html").write_text("the report's atlas")
    cfg = build(GraphConfig, {"store": analyze_env["store_url"], "clt": str(analyze_env["run_dir"]), "out": str(out),
                              "image": str(analyze_env["data"]["paths"][1]), "device": "cpu"})
    summary = run_graph(cfg)
    assert summary["store_index"] is None and summary["completeness error"] <= COMPLETENESS_TOL
    by_index = run_graph(build(GraphConfig, {**{k: getattr(cfg, k) for k in ("store", "clt", "device")},
                                             "out": str(tmp_path / "by-index"), "image": "1", "atlas": False}))
    assert by_index["predicted"] == summary["predicted"] and by_index["nodes"] == summary["nodes"]
    assert (out / "atlas" / "index.html").read_text() == "the report's atlas"
    page = (out / "graph.html").read_text()
    assert "kept as it is" in page and "atlas/features/" not in page  # no page there: nothing linked


# ------------------------------------------------------------------------------------------ the analyze part

def _first_of(store, name: str) -> int:
    import numpy as np

    from clt_pipe.analyze.zeroshot import eval_images

    idx = eval_images(store)
    return int(idx[np.flatnonzero(store.labels[idx] == list(store.class_names).index(name))[0]])


def test_default_graph_images_spread_over_the_classes(analyze_env):
    from clt_pipe.analyze.graph.part import choose_images

    store = analyze_env["store"]
    names = list(store.class_names)
    chosen, rule = choose_images(store, [], 3)
    labels = [names[int(store.labels[i])] for i in chosen]
    assert len(set(labels)) == 3 and labels[0] == names[0] and labels[-1] == names[-1]
    assert chosen == [_first_of(store, n) for n in labels] and "spread" in rule
    assert len(choose_images(store, [], 50)[0]) == len(names)  # never more than one image per class
    assert choose_images(store, ["fox", "2", "fox"], 3)[0] == [_first_of(store, "fox"), 2]


def test_analyze_graphs_part_links_every_kept_feature_to_the_reports_atlas(analyze_env, tmp_path_factory,
                                                                          page_checker):
    """`analyze --only graphs,atlas`: each chosen image's graph in OUT/graphs/, exact, the same graph as the
    command's, every kept feature node with a page in the report's atlas; the pages render with no dead link."""
    from clt_pipe.analyze.graph.run import run_graph
    from clt_pipe.analyze.run import run_analyze
    from clt_pipe.config import GraphConfig, build
    from tests.conftest import analyze_config

    out = tmp_path_factory.mktemp("analyze-graphs")
    summary = run_analyze(analyze_config(analyze_env, out=str(out), only=["graphs", "atlas"],
                                         graph_images=["dog", "3"], atlas_top_per_layer=1, atlas_top_images=2))
    assert summary["graphs"] == 2 and summary["graphs_completeness_error_max"] <= COMPLETENESS_TOL
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]["graphs"]["rows"]
    assert [r["image"] for r in rows] == [_first_of(analyze_env["store"], "dog"), 3]
    import pyarrow.parquet as pq

    assert pq.read_table(out / "graphs.parquet").num_rows == 2
    for r in rows:
        assert r["completeness_error"] <= COMPLETENESS_TOL and 0.0 <= r["replacement_score"] <= 1.0
        graph = json.loads((out / r["page"]).with_name("graph.json").read_text())
        assert graph["kept_features"], "nothing kept: the link check below would check nothing"
        html = (out / r["page"]).read_text()
        for f in graph["kept_features"]:
            fid = f"L{f['layer']}-F{f['feature']}"
            assert (out / "atlas" / "features" / f"{fid}.html").is_file(), fid
            assert f"href='../../atlas/features/{fid}.html'" in html
    command = run_graph(build(GraphConfig, {"store": analyze_env["store_url"], "clt": str(analyze_env["run_dir"]),
                                            "out": str(tmp_path_factory.mktemp("graph-3")), "image": "3",
                                            "device": "cpu", "atlas": False}))
    mine = json.loads((out / rows[1]["page"]).with_name("graph.json").read_text())
    for key in ("nodes", "feature nodes", "kept nodes", "kept edges", "predicted", "target"):
        assert mine[key] == command[key], key
    assert "Attribution graphs" in (out / "report.html").read_text()
    assert page_checker.problems(out / rows[0]["page"]) == []
    assert page_checker.problems(out / "report.html") == []


def test_analyze_graphs_without_the_atlas_say_so(analyze_env, tmp_path):
    from clt_pipe.analyze.run import run_analyze
    from tests.conftest import analyze_config

    out = tmp_path / "r"
    run_analyze(analyze_config(analyze_env, out=str(out), only=["graphs"], graph_count=1))
    (row,) = json.loads((out / "report.json").read_text())["results"]["graphs"]["rows"]
    page = (out / row["page"]).read_text()
    assert "atlas part did not run" in page and "atlas/features/" not in page
    assert not (out / "atlas").exists()


@pytest.mark.parametrize("value, needle", [("zebra", "neither a store image index nor a class"),
                                           ("999", "outside the store")])
def test_analyze_bad_graph_image_is_one_error_line(analyze_env, tmp_path, capsys, monkeypatch, value, needle):
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, monkeypatch, [
        "analyze", "--store", analyze_env["store_url"], "--clt", str(analyze_env["run_dir"]), "--out", str(out),
        "--device", "cpu", "--only", "graphs", "--graph-images", value])
    assert_one_line_error(code, err, needle)
    assert not (out / "report.json").exists() and not (out / "graphs").exists()


def _set_precision(path: str, value: str) -> str:
    from clt_pipe.precision import _backend

    node = _backend(path)
    old, node.fp32_precision = node.fp32_precision, value
    return old


@pytest.mark.parametrize("api", ["legacy", "per-backend"])
def test_graph_arithmetic_is_float32_whatever_the_process_set(analyze_env, api):
    """A caller's bf16 autocast or TF32/bf16 float32 settings (a fit in the same process sets such things) must
    not reach the graph: its completeness bound is a float32 bound. torch ≥ 2.9's per-backend settings are
    honoured too (its legacy getter raises once they are used). The settings come back afterwards."""
    bb, clt = analyze_env["bb"], analyze_env["clt"]
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(4))
    if api == "per-backend" and not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has no per-backend float32 precision settings")
    restore = []
    if api == "legacy":
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
        restore.append(lambda: torch.set_float32_matmul_precision(before))
    else:
        for path, value in (("cuda.matmul", "tf32"), ("mkldnn.matmul", "bf16")):
            old = _set_precision(path, value)
            restore.append(lambda path=path, old=old: _set_precision(path, old))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, g = _graph_of(bb, clt, image)
            assert torch.is_autocast_cpu_enabled()
            if api == "legacy":
                assert torch.get_float32_matmul_precision() == "medium"
            else:
                from clt_pipe.precision import _backend

                assert (_backend("cuda.matmul").fp32_precision, _backend("mkldnn.matmul").fp32_precision) == \
                    ("tf32", "bf16")
    finally:
        for undo in reversed(restore):
            undo()
    assert g.adjacency.dtype == torch.float32 and g.completeness_error() <= COMPLETENESS_TOL


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 0.98, 1.0])
def test_find_threshold_skipping_zeros_is_circuit_tracers(threshold):
    """Ours sorts only the non-zero scores (an edge-score matrix is nearly all zeros); the threshold is the same
    as circuit-tracer's full sort, also at 1.0 where it falls into the zeros."""
    pytest.importorskip("circuit_tracer")
    from circuit_tracer.graph import find_threshold as theirs

    from clt_pipe.analyze.graph.prune import find_threshold

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(300, 300, generator=g) * (torch.rand(300, 300, generator=g) < 0.02)
    assert float(find_threshold(scores, threshold)) == float(theirs(scores.flatten(), threshold))
    dense = torch.rand(500, generator=g)
    assert float(find_threshold(dense, threshold)) == float(theirs(dense, threshold))


def test_find_threshold_past_the_non_zeros_is_circuit_tracers():
    """The cumulative share ends at 0.99999994 < 1.0: circuit-tracer's index lands in the zeros, threshold 0."""
    pytest.importorskip("circuit_tracer")
    from circuit_tracer.graph import find_threshold as theirs

    from clt_pipe.analyze.graph.prune import find_threshold

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, 1000, generator=g) * (torch.rand(1000, 1000, generator=g) < 0.05)
    assert float(theirs(scores.flatten(), 1.0)) == 0.0, "the case no longer reaches past the non-zeros"
    assert float(find_threshold(scores, 1.0)) == 0.0


def test_find_threshold_total_rounds_as_circuit_tracers():
    """A total over the non-zeros alone rounds differently from circuit-tracer's over the full length (zeros
    included) and moves some thresholds by one score: at those, ours must still be circuit-tracer's. Which
    thresholds they are depends on the reduction order (threads), so they are found here, with 2 threads (the
    suite runs on 1, where the two sums happen to agree)."""
    pytest.importorskip("circuit_tracer")
    from circuit_tracer.graph import find_threshold as theirs

    from clt_pipe.analyze.graph.prune import find_threshold

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_total_rounding(theirs, find_threshold)
    finally:
        torch.set_num_threads(threads)


def _check_total_rounding(theirs, find_threshold):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3000, 3000, generator=g) * (torch.rand(3000, 3000, generator=g) < 0.01)
    flat = scores.flatten()
    s = torch.sort(flat[flat != 0], descending=True).values
    full = torch.cumsum(s, 0) / torch.sort(flat, descending=True).values.sum()
    naive = torch.cumsum(s, 0) / s.sum()
    moved = [t for t in torch.linspace(0.5, 0.999, 5000).tolist()
             if s[int(torch.searchsorted(full, torch.tensor(t)))] != s[int(torch.searchsorted(naive, torch.tensor(t)))]]
    assert moved, "no threshold tells the two totals apart any more"
    for t in moved[:3]:
        assert float(find_threshold(scores, t)) == float(theirs(flat, t))
        assert float(s[int(torch.searchsorted(naive, torch.tensor(t)))]) != float(theirs(flat, t))


def test_strongest_paths_are_the_best_products_over_kept_edges():
    """Brute force on a small layered graph: every path to the target over kept edges enumerated."""
    from clt_pipe.analyze.graph import prune as PR

    g = torch.Generator().manual_seed(5)
    layers = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # sources … target 9; edges go to the next layers only
    N = 10
    key = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    adj = torch.zeros(N, N)
    for t in range(N):
        for s in range(N):
            if key[s] < key[t]:
                adj[t, s] = torch.randn((), generator=g)
    mask = (torch.rand(N, N, generator=g) < 0.6) & (adj != 0)
    share = adj.abs() / adj.abs().sum(1, keepdim=True)

    def best_from(node):
        if node == 9:
            return 1.0, [9]
        options = [(float(share[t, node]) * best_from(t)[0], [node] + best_from(t)[1])
                   for t in range(N) if mask[t, node]]
        options = [o for o in options if o[0] > 0]
        return max(options) if options else (0.0, [])

    sources = torch.tensor(layers[0] + layers[1])
    got = PR.strongest_paths(adj, mask, key, 9, sources, k=6)
    want = sorted((best_from(int(s)) for s in sources if best_from(int(s))[0] > 0), reverse=True)
    assert got and [p for _, p in got] == [p for _, p in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], rel=1e-6)


def test_graph_images_by_index_or_class_name_even_when_names_are_digits():
    """ImageFolder classes named 1, 2, 7, 9: a bare "7" is the class (as --target reads it), image:7 the index."""
    from types import SimpleNamespace

    import numpy as np

    from clt_pipe.analyze.graph.part import choose_images
    from clt_pipe.errors import CltPipeError

    store = SimpleNamespace(class_names=["1", "2", "7", "9"], labels=np.array([0, 0, 1, 1, 2, 2, 3, 3]),
                            image_ok=np.ones(8, bool), layout=SimpleNamespace(n_images=8))
    assert choose_images(store, ["7"], 3)[0] == [4]
    assert choose_images(store, ["class:7", "image:7", "3"], 3)[0] == [4, 7, 3]
    for bad in ("image:x", "class:8", "8"):
        with pytest.raises(CltPipeError):
            choose_images(store, [bad], 3)


@pytest.mark.parametrize("policy, fit_tokens, want", [
    ("all", "all", None), ("cls+4", "all", None), ("cls", "all", [0]), ("all", "cls", [0]),
    ("patches", "all", [1, 2, 3]), ("all", "patches", [1, 2, 3]), ("cls+4", "patches", [1, 2, 3])])
def test_feature_nodes_only_where_the_clt_was_trained(policy, fit_tokens, want):
    from clt_pipe.analyze.graph.run import trained_positions

    mask, text = trained_positions({"store": {"tokens": {"policy": policy}}, "config": {"tokens": fit_tokens}}, 4)
    assert (mask is None and want is None and text == "every position") or \
        torch.nonzero(mask).squeeze(1).tolist() == want and policy in text


def test_a_cls_trained_clt_has_feature_nodes_at_cls_only_and_stays_exact(analyze_env):
    from clt_pipe.analyze.graph.attribution import replacement_logits

    bb, clt = analyze_env["bb"], analyze_env["clt"]
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(8))
    cls_only = torch.zeros(17, dtype=torch.bool)
    cls_only[0] = True
    rep, g = _graph_of(bb, clt, image, feature_positions=cls_only)
    _, everywhere = _graph_of(bb, clt, image)
    assert g.n_features and set(g.active_features[:, 1].tolist()) == {0}
    assert g.n_features < everywhere.n_features
    assert g.completeness_error() <= COMPLETENESS_TOL
    assert torch.allclose(replacement_logits(rep, g, clt), g.logits, atol=1e-4)


def test_a_failed_analyze_leaves_the_previous_graphs_as_they_were(analyze_env, tmp_path, monkeypatch):
    """The graphs are staged and renamed into place just before the report: a run that fails after building
    them (here in the atlas's pass) leaves the previous report's pages where its report.json says they are."""
    from clt_pipe.analyze import run as RUN
    from tests.conftest import analyze_config

    out = tmp_path / "r"
    RUN.run_analyze(analyze_config(analyze_env, out=str(out), only=["graphs"], graph_images=["cat"]))
    (row,) = json.loads((out / "report.json").read_text())["results"]["graphs"]["rows"]
    before = (out / row["page"]).read_text()
    assert json.loads((out / row["page"]).with_name("graph.json").read_text())["page"] == "graph.html"

    def boom(*a, **k):
        raise RuntimeError("the pass failed")

    monkeypatch.setattr(RUN, "run_stream_parts", boom)
    with pytest.raises(RuntimeError):
        RUN.run_analyze(analyze_config(analyze_env, out=str(out), only=["graphs", "fidelity"], graph_images=["dog"]))
    assert (out / row["page"]).read_text() == before
    assert sorted(p.name for p in (out / "graphs").iterdir()) == [f"image-{row['image']}"]


def test_analyze_graphs_from_a_moved_data_root_say_what_to_pass(analyze_env, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, [
        "analyze", "--store", analyze_env["store_url"], "--clt", str(analyze_env["run_dir"]),
        "--out", str(tmp_path / "r"), "--device", "cpu", "--only", "graphs", "--data-root", str(tmp_path / "gone")])
    assert_one_line_error(code, err, "pass --data-root")


def test_analyze_graphs_of_a_cls_trained_clt_put_features_at_cls_only(analyze_env, tmp_path):
    """The run's own record of what it was fitted on (fit tokens = cls) reaches the graphs part: feature nodes at
    CLS only, said in the row, graph.json and the report."""
    from clt_pipe.analyze.run import run_analyze
    from clt_pipe.clt.rundir import save_fitted
    from tests.conftest import analyze_config

    store = analyze_env["store"]
    run_dir = tmp_path / "cls-run"
    save_fitted(run_dir, analyze_env["clt"], {
        "store": {"url": analyze_env["store_url"], "fingerprint": store.meta.fingerprint, "model": store.model,
                  "n_layers": store.n_layers, "d_model": store.d_model}, "config": {"tokens": "cls"}})
    out = tmp_path / "r"
    run_analyze(analyze_config(analyze_env, clt=str(run_dir), out=str(out), only=["graphs"], graph_count=1))
    (row,) = json.loads((out / "report.json").read_text())["results"]["graphs"]["rows"]
    assert row["feature_positions"].startswith("CLS only")
    graph = json.loads((out / row["page"]).with_name("graph.json").read_text())
    assert graph["kept_features"] and {f["position"] for f in graph["kept_features"]} == {0}
    assert row["completeness_error"] <= COMPLETENESS_TOL
    assert "Feature nodes at CLS only" in (out / "report.html").read_text()
