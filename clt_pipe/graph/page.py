"""Our page of one graph, ``OUT/graph.html``, self-contained in the atlas's style (``analyze/atlas/render.py``).

It shows the image twice with a per-patch heatmap: the *total influence* on the target of every node at the
patch (its features, its error nodes and its embedding), and the influence of the patch's embedding alone
(where the evidence enters); then the strongest paths from a patch to the target logit (a path's strength is
the product of its edges' shares of their target's input, over the kept edges), the strongest paths from a
feature node, and every kept feature node,
ranked by influence, linked to its atlas page (``OUT/atlas/features/L<l>-F<f>.html``).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clt_pipe.analyze.atlas import render as RD
from clt_pipe.analyze.atlas.images import center_square
from clt_pipe.graph import prune as PR

PAGE = "graph.html"


def position_influence(graph, influence: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(total influence of the nodes at each position [P], influence of each position's embedding [P])."""
    inf = influence.detach().double().cpu()
    P = graph.n_pos
    total = torch.zeros(P, dtype=torch.float64)
    nf = graph.n_features
    if nf:
        total.index_add_(0, graph.active_features[:, 1].cpu(), inf[:nf])
    total += inf[graph.error_start:graph.token_start].reshape(graph.n_layers, P).sum(0)
    emb = inf[graph.token_start:graph.logit_start]
    return (total + emb).numpy(), emb.numpy()


def order_key(graph) -> torch.Tensor:
    """Every edge goes from a lower key to a higher: embeddings −1, features and errors their layer, logits L."""
    key = torch.empty(graph.n_nodes, dtype=torch.long)
    key[:graph.n_features] = graph.active_features[:, 0].cpu()
    key[graph.error_start:graph.token_start] = torch.arange(graph.n_layers).repeat_interleave(graph.n_pos)
    key[graph.token_start:graph.logit_start] = -1
    key[graph.logit_start:] = graph.n_layers
    return key


class NodeNames:
    def __init__(self, graph, labels: list[str], atlas_dir: Path | None):
        self.g, self.labels, self.atlas = graph, labels, atlas_dir

    def feature_link(self, layer: int, f: int) -> str:
        fid = RD.feature_id(layer, f)
        if self.atlas is not None and (self.atlas / "features" / f"{fid}.html").is_file():
            return f"<a href='atlas/features/{fid}.html'>{fid}</a>"
        return fid

    def __call__(self, i: int) -> str:
        g = self.g
        if i < g.n_features:
            layer, p, f = g.active_features[i].tolist()
            return f"{self.feature_link(layer, f)} @ {html.escape(self.labels[p])}"
        if i < g.token_start:
            layer, p = divmod(i - g.error_start, g.n_pos)
            return f"error L{layer} @ {html.escape(self.labels[p])}"
        if i < g.logit_start:
            return f"embedding @ {html.escape(self.labels[i - g.token_start])}"
        return f"logit <b>{html.escape(g.logit_nodes[i - g.logit_start].label)}</b>"


def write(out: Path, graph, pruned, summary: dict, image, grid: tuple[int, int], labels: list[str], cfg, ct: dict,
          atlas_note: str | None) -> Path:
    img_dir = out / "graph-img"
    img_dir.mkdir(parents=True, exist_ok=True)
    px = cfg.thumb_px
    base = center_square(image, px)
    total, emb = position_influence(graph, pruned.influence)
    pos = np.arange(graph.n_pos)
    figs = []
    for name, vals, what in (("total", total, "total influence of the nodes at each patch"),
                             ("embedding", emb, "influence of each patch's embedding")):
        heat = RD.heat_grid(pos, vals, grid)
        RD.heatmap_png(img_dir / f"{name}.png", heat, float(np.nanmax(heat)) if np.isfinite(heat).any() else 0.0,
                       px, base)
        figs.append(f"<figure><img src='graph-img/{name}.png' width='{px}' height='{px}' alt='{name} influence'>"
                    f"{html.escape(what)}<br>CLS: {vals[0]:.3g}</figure>")
    Image.fromarray(base).save(img_dir / "image.png")
    figs.insert(0, f"<figure><img src='graph-img/image.png' width='{px}' height='{px}' alt='image'>the image"
                   f"</figure>")
    atlas_dir = out / "atlas" if (out / "atlas" / "index.html").is_file() else None
    name = NodeNames(graph, labels, atlas_dir)
    adj, em = graph.adjacency.cpu(), pruned.edge_mask.cpu()
    tokens = torch.arange(graph.token_start + 1, graph.logit_start)  # patch embeddings (CLS has no pixels)
    key = order_key(graph)
    features = torch.arange(graph.n_features)

    def path_rows(sources) -> str:
        paths = PR.strongest_paths(adj, em, key, graph.logit_start, sources, cfg.paths)
        return "".join(
            f"<tr><td data-v='{s}'>{s:.3g}</td><td class='l'>{' → '.join(name(i) for i in p)}</td></tr>"
            for s, p in paths) or "<tr><td></td><td class='l'>no path over the kept edges</td></tr>"
    nf = graph.n_features
    mask = pruned.node_mask[:nf].cpu()
    inf = pruned.influence[:nf].detach().cpu()
    kept = torch.nonzero(mask).squeeze(1).tolist()
    kept.sort(key=lambda i: -float(inf[i]))
    feat_rows = []
    for i in kept:
        layer, p, f = graph.active_features[i].tolist()
        feat_rows.append(f"<tr data-s='{html.escape(f'L{layer}-F{f} {labels[p]}'.lower())}'>"
                         f"<td class='l'>{name.feature_link(layer, f)}</td><td data-v='{layer}'>{layer}</td>"
                         f"<td class='l' data-v='{p}'>{html.escape(labels[p])}</td>"
                         f"<td data-v='{float(graph.activations[i])}'>{float(graph.activations[i]):.3g}</td>"
                         f"<td data-v='{float(inf[i])}'>{float(inf[i]):.3g}</td></tr>")
    logit_rows = "".join(
        f"<tr><td class='l'>{html.escape(n.label)}</td><td>{n.prob:.3g}</td>"
        f"<td>{float(graph.inputs[graph.logit_start + k]):.4g}</td></tr>" for k, n in enumerate(graph.logit_nodes))
    head = ("<table>" + "".join(
        f"<tr><td class='l'>{html.escape(str(k))}</td><td class='l'>{html.escape(_fmt(v))}</td></tr>"
        for k, v in summary.items()) + "</table>")
    ct_links = ("<p>circuit-tracer files: <a href='circuit-tracer/graph.pt'>graph.pt</a> · "
                "<a href='circuit-tracer/graph_files/graph-metadata.json'>graph-metadata.json</a> "
                "(its viewer loads d3 from the web)</p>" if ct.get("json") else
                f"<p class='note'>{html.escape(ct.get('note', ''))}</p>")
    atlas_link = ("<p><a href='atlas/index.html'>atlas</a></p>" if atlas_dir is not None else "") + (
        f"<p class='note'>{html.escape(atlas_note)}</p>" if atlas_note else "")
    body = (f"<h1>Attribution graph: {html.escape(str(summary.get('image')))} → "
            f"{html.escape(graph.logit_nodes[0].label)}</h1>{head}{ct_links}{atlas_link}"
            f"<div class='thumbs'>{''.join(figs)}</div>"
            "<h2 id='logits'>Logit nodes</h2><table><tr><th>class</th><th>p</th><th>input (logit − mean)</th></tr>"
            f"{logit_rows}</table>"
            f"<h2 id='paths'>Strongest paths from a patch to the target</h2><table><thead><tr><th>strength</th>"
            f"<th>path</th></tr></thead><tbody>{path_rows(tokens)}</tbody></table>"
            f"<h2 id='feature-paths'>Strongest paths from a feature to the target</h2><table><thead><tr>"
            f"<th>strength</th><th>path</th></tr></thead><tbody>{path_rows(features)}</tbody></table>"
            f"<h2 id='features'>Kept feature nodes ({len(kept)} of {nf})</h2>"
            "<p><input id='q' placeholder='search: L3-F17, patch r1…' oninput='filterRows(this.value)' size='40'></p>"
            "<table><thead><tr>" + "".join(f"<th onclick='sortBy(this)'>{c}</th>" for c in (
                "feature", "layer", "position", "activation", "influence")) + "</tr></thead><tbody>"
            + "".join(feat_rows) + "</tbody></table>")
    path = out / PAGE
    path.write_text(RD._page("Attribution graph", body), encoding="utf-8")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
