"""Attribution graph of one image (``clt-pipe graph``'s attribution, ``clt_pipe.analyze.graph``) at ViT-B/32 sizes.

open_clip's ViT-B-32 geometry with random weights (``--layers`` of them), a random ReLU-TopK CLT
(``--expansion`` × d features, ``--k``), one random 224 px image: 50 positions × L × k feature nodes (12 layers,
k 32: 19,200). Prints the node count, the attribution time per backward batch size side by side (interleaved
repeats, medians; the ratio to the first batch size), the peak GPU memory of each, the pruning time and the
completeness error (the acceptance bound is 1e-4 in float32).

    python benchmarks/bench_graph.py --device cuda --layers 12 --k 32 --batch-sizes 256,1024 --write
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import append_result, machine, sync  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch-sizes", default="256,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed builds first (kernels, allocator); 0 on a CPU "
                                                          "where one 12-layer build takes minutes")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--vs-circuit-tracer", action=argparse.BooleanOptionalAction, default=True,
                    help="also run circuit-tracer's own prune_graph on the same adjacency (after ours: its peak "
                         "memory is several N x N copies) and compare masks and time")
    args = ap.parse_args()

    import open_clip

    from clt_pipe.backbone.loading import load_backbone
    from clt_pipe.clt.model import CrossLayerTranscoder
    from clt_pipe.clt.spec import CLTSpec
    from clt_pipe.analyze.graph import prune as PR
    from clt_pipe.analyze.graph.attribution import build_graph
    from clt_pipe.analyze.graph.page import page_data
    from clt_pipe.analyze.graph.replacement import Replacement, capture

    dev = torch.device(args.device)
    cfg = open_clip.get_model_config("ViT-B-32")
    cfg["vision_cfg"]["layers"] = args.layers
    cfg["text_cfg"]["layers"] = 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-graph-"))
    (tmp / "vit-b-32-bench.json").write_text(json.dumps(cfg))
    bb = load_backbone(str(tmp / "vit-b-32-bench.json"), "none", dev)
    d = bb.visual.transformer.width
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTSpec(args.layers, d, args.expansion * d, "relu_topk", args.k)).to(dev).eval()
    image = torch.randn(3, 224, 224, device=dev)
    cap, W = capture(bb.visual, image)
    clf = torch.nn.functional.normalize(torch.randn(args.classes, cap.embedding.shape[0], device=dev), dim=-1)
    rep = Replacement(cap, W, clf, 100.0)
    names = [str(i) for i in range(args.classes)]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    times: dict[int, list[float]] = {b: [] for b in sizes}
    peak: dict[int, float] = {}
    graph = None
    for _ in range(args.warmup):  # kernels, allocator
        build_graph(rep, clt, names, batch_size=sizes[0])
    for _ in range(args.repeats):
        for b in sizes:
            graph = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t0 = time.perf_counter()
            graph = build_graph(rep, clt, names, batch_size=b)
            sync(dev)
            times[b].append(time.perf_counter() - t0)
            if dev.type == "cuda":
                peak[b] = torch.cuda.max_memory_allocated(dev) / 2**30
    assert graph is not None
    err = graph.completeness_error()
    sync(dev)
    t0 = time.perf_counter()
    pruned = PR.prune(graph.adjacency, graph.target_weights, graph.n_features, graph.n_pos)
    sync(dev)
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = PR.graph_scores(graph.adjacency, pruned.influence, graph.target_weights,
                             slice(graph.error_start, graph.token_start), slice(graph.token_start, graph.logit_start))
    page_data(graph, pruned, 10)  # what the page and the analyze part keep: heatmaps, strongest paths
    sync(dev)
    t_page = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    vs_ct = circuit_tracer_prune(graph, pruned, dev) if args.vs_circuit_tracer else ""
    med = {b: statistics.median(v) for b, v in times.items()}
    setting = (f"ViT-B/32 geometry, {args.layers} layers, random init; CLT x{args.expansion} k {args.k}; "
               f"{graph.n_features} feature nodes, {graph.n_nodes} nodes")
    print(setting)
    for b in sizes:
        mem = f", peak {peak[b]:.2f} GiB" if b in peak else ""
        print(f"batch {b}: attribution {med[b]:.3f} s (ratio to batch {sizes[0]}: {med[b] / med[sizes[0]]:.2f}){mem}")
    print(f"prune {t_prune:.3f} s, kept {int(pruned.node_mask.sum())} nodes, {int(pruned.edge_mask.sum())} edges")
    print(f"scores and page data {t_page:.3f} s (replacement score {scores['replacement']:.3f}); "
          f"peak host RSS of the process {rss:.1f} GiB")
    print(f"completeness error {err:.3g} (bound 1e-4)")
    if vs_ct:
        print(vs_ct)
    print(machine())
    if args.write:
        measured = "; ".join(f"batch {b}: {med[b]:.2f} s" + (f" ({peak[b]:.1f} GiB)" if b in peak else "")
                             for b in sizes)
        append_result(f"| graph attribution, one image | {setting} | {measured}; prune {t_prune:.2f} s; "
                      f"scores + page data {t_page:.2f} s; peak RSS {rss:.1f} GiB; "
                      f"completeness error {err:.2g} | {med[sizes[-1]] / med[sizes[0]]:.2f} |")


def circuit_tracer_prune(graph, pruned, dev) -> str:
    """circuit-tracer's ``prune_graph`` on our adjacency, side by side with ours: its time and whether the masks
    are equal (empty when circuit-tracer is not importable)."""
    from types import SimpleNamespace

    try:
        from circuit_tracer.graph import prune_graph
    except Exception as e:  # noqa: BLE001 - not installed or its stack broken
        return f"circuit-tracer prune_graph: not run ({type(e).__name__})"
    g = SimpleNamespace(adjacency_matrix=graph.adjacency, logit_probabilities=graph.target_weights,
                        input_tokens=range(graph.n_pos), logit_targets=graph.logit_nodes,
                        selected_features=range(graph.n_features))
    sync(dev)
    t0 = time.perf_counter()
    theirs = prune_graph(g)
    sync(dev)
    t = time.perf_counter() - t0
    same = torch.equal(theirs.node_mask, pruned.node_mask) and torch.equal(theirs.edge_mask, pruned.edge_mask)
    return (f"circuit-tracer prune_graph on the same adjacency: {t:.3f} s, masks equal to ours: {same} "
            f"({int(theirs.edge_mask.sum())} edges)")


if __name__ == "__main__":
    main()
