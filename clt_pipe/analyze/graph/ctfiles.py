"""The graph in circuit-tracer's own files, written by circuit-tracer's own code (0.5.0).

* ``circuit-tracer/graph.pt``: its ``Graph`` (``Graph.from_pt`` reads it; its ``prune_graph`` and
  ``create_graph_files`` take it). Positions stand in for tokens: ``input_tokens`` = 0..P−1, and
  ``logit_targets`` are the logit nodes (class name, class index; a ``--versus`` node has the virtual index
  n_classes as circuit-tracer numbers targets outside the vocabulary). ``logit_probabilities`` holds the
  *target weights* (1 on the target, 0 elsewhere): that field is what circuit-tracer's pruning weighs influence
  by, so its pruning of this file is ours.
* ``circuit-tracer/graph_files/<slug>.json`` and ``graph-metadata.json``: the pruned graph as its viewer reads it,
  made by its ``create_nodes`` / ``create_used_nodes_and_edges`` / ``build_model`` with our pruning masks and a
  tokenizer that names positions (``CLS``, ``patch r2 c3``). Its ``create_graph_files`` is not called because it
  loads a Hugging Face tokenizer by name, which a ViT does not have. The viewer itself loads d3 from the web.

Without circuit-tracer installed nothing here is written, and the summary says so.
"""

from __future__ import annotations

import json
from pathlib import Path

CT_DIR = "circuit-tracer"


class PositionTokenizer:
    """What circuit-tracer's graph-file code asks a tokenizer for: ``decode(token id)``; ids are positions."""

    def __init__(self, labels: list[str]):
        self.labels = labels

    def decode(self, t) -> str:
        return self.labels[int(t)]


def write(graph, pruned, out: Path, slug: str, labels: list[str], *, model_name: str, scan: str, d_mlp: int,
          n_heads: int, node_threshold: float, edge_threshold: float) -> dict:
    try:
        import torch
        from circuit_tracer.attribution.targets import LogitTarget
        from circuit_tracer.frontend.utils import add_graph_metadata
        from circuit_tracer.graph import Graph
        from circuit_tracer.utils.create_graph_files import build_model, create_nodes, create_used_nodes_and_edges
        from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig
    except Exception as e:  # noqa: BLE001 - not installed, or its optional stack broken
        return {"note": f"circuit-tracer files not written (circuit-tracer not importable: {type(e).__name__})"}
    d = int(graph.errors.shape[-1])
    cfg = UnifiedConfig(n_layers=graph.n_layers, d_model=d, d_head=d // n_heads, n_heads=n_heads, d_mlp=d_mlp,
                        d_vocab=int(graph.meta["n_classes"]), tokenizer_name="clt-pipe:vit-positions",
                        model_name=model_name, original_architecture="open_clip VisionTransformer")
    ct = Graph(input_string=slug, input_tokens=torch.arange(graph.n_pos),
               active_features=graph.active_features.cpu(), adjacency_matrix=graph.adjacency.cpu(), cfg=cfg,
               selected_features=torch.arange(graph.n_features), activation_values=graph.activations.cpu(),
               logit_targets=[LogitTarget(n.label, n.index) for n in graph.logit_nodes],
               logit_probabilities=graph.target_weights.cpu(), scan=scan,
               vocab_size=int(graph.meta["n_classes"]))
    root = out / CT_DIR
    files = root / "graph_files"
    files.mkdir(parents=True, exist_ok=True)
    ct.to_pt(str(root / "graph.pt"))
    tok = PositionTokenizer(labels)
    nodes = create_nodes(ct, pruned.node_mask.cpu(), tok, pruned.cumulative_scores.cpu())
    used_nodes, used_edges = create_used_nodes_and_edges(ct, nodes, pruned.edge_mask.cpu())
    model = build_model(ct, used_nodes, used_edges, slug, scan, node_threshold, tok)
    (files / f"{slug}.json").write_text(model.model_dump_json(indent=1))
    add_graph_metadata(model.metadata.model_dump(), str(files))
    (root / "README.txt").write_text(
        "circuit-tracer files of this graph (clt-pipe graph).\n"
        f"graph.pt: circuit_tracer.graph.Graph.from_pt('graph.pt'); pruned here with node_threshold "
        f"{node_threshold}, edge_threshold {edge_threshold}.\n"
        "graph_files/: serve with circuit_tracer's local server (python -m circuit_tracer start-server "
        "--graph_file_dir graph_files); its viewer loads d3 from the web.\n"
        + json.dumps({"positions": labels}) + "\n")
    return {"pt": str(root / "graph.pt"), "json": str(files / f"{slug}.json"), "dir": str(root)}
