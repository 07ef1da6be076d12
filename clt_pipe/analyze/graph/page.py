"""Our page of one graph, ``OUT/graph.html``, self-contained in the atlas's style (``analyze/atlas/render.py``).

It shows the image twice with a per-patch heatmap: the *total influence* on the target of every node at the
patch (its features, its error nodes and its embedding), and the influence of the patch's embedding alone
(where the evidence enters); then the strongest paths from a patch to the target logit (a path's strength is
the product of its edges' shares of their target's input, over the kept edges), the strongest paths from a
feature node, and every kept feature node,
ranked by influence, linked to its atlas page (``OUT/atlas/features/L<l>-F<f>.html`` for the command,
``OUT/atlas/`` of the report for an ``analyze`` graph in ``OUT/graphs/<image>/``).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clt_pipe.analyze.atlas import render as RD
from clt_pipe.analyze.atlas.images import center_square
from clt_pipe.analyze.graph import prune as PR

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


@dataclass
class PageData:
    """What the page shows, small and on the CPU: taken right after pruning so that the N × N adjacency can be
    freed before the page is written (``analyze`` renders its atlas between building its graphs and writing
    their pages). Nodes are named by ``node_ref`` tuples; the page resolves them to text and atlas links."""

    target: str
    total: np.ndarray  # [P] total influence of the nodes at each position
    embedding: np.ndarray  # [P] influence of each position's embedding
    logits: list[tuple[str, float, float]]  # (class, probability, input = logit − mean)
    patch_paths: list[tuple[float, list[tuple]]]  # strongest paths from a patch embedding to the target
    feature_paths: list[tuple[float, list[tuple]]]
    kept: list[tuple[int, int, int, float, float]]  # (layer, position, feature, activation, influence), ranked
    n_features: int


def node_ref(graph, i: int) -> tuple:
    if i < graph.n_features:
        return ("feature", *graph.active_features[i].tolist())
    if i < graph.token_start:
        return ("error", *divmod(i - graph.error_start, graph.n_pos))
    if i < graph.logit_start:
        return ("embedding", i - graph.token_start)
    return ("logit", graph.logit_nodes[i - graph.logit_start].label)


def page_data(graph, pruned, n_paths: int) -> PageData:
    total, emb = position_influence(graph, pruned.influence)
    adj, em = graph.adjacency, pruned.edge_mask
    key = order_key(graph).to(adj.device)

    def paths(sources: torch.Tensor) -> list[tuple[float, list[tuple]]]:
        found = PR.strongest_paths(adj, em, key, graph.logit_start, sources, n_paths)
        return [(s, [node_ref(graph, i) for i in p]) for s, p in found]

    nf = graph.n_features
    inf = pruned.influence[:nf].detach().cpu()
    kept = torch.nonzero(pruned.node_mask[:nf].cpu()).squeeze(1).tolist()
    kept.sort(key=lambda i: -float(inf[i]))
    return PageData(
        target=graph.logit_nodes[0].label, total=total, embedding=emb,
        logits=[(n.label, n.prob, float(graph.inputs[graph.logit_start + k])) for k, n in enumerate(graph.logit_nodes)],
        patch_paths=paths(torch.arange(graph.token_start + 1, graph.logit_start)),  # CLS's embedding has no pixels
        feature_paths=paths(torch.arange(nf)),
        kept=[(*graph.active_features[i].tolist(), float(graph.activations[i]), float(inf[i])) for i in kept],
        n_features=nf)


class NodeNames:
    """Node refs as page text; a feature links to its atlas page where ``atlas_dir`` holds one."""

    def __init__(self, labels: list[str], out: Path, atlas_dir: Path | None):
        self.labels, self.atlas = labels, atlas_dir
        self.href = Path(os.path.relpath(atlas_dir, out)).as_posix() if atlas_dir is not None else ""

    def feature_link(self, layer: int, f: int) -> str:
        fid = RD.feature_id(layer, f)
        if self.atlas is not None and (self.atlas / "features" / f"{fid}.html").is_file():
            return f"<a href='{self.href}/features/{fid}.html'>{fid}</a>"
        return fid

    def __call__(self, ref: tuple) -> str:
        kind, *rest = ref
        if kind == "feature":
            layer, p, f = rest
            return f"{self.feature_link(layer, f)} @ {html.escape(self.labels[p])}"
        if kind == "error":
            layer, p = rest
            return f"error L{layer} @ {html.escape(self.labels[p])}"
        if kind == "embedding":
            return f"embedding @ {html.escape(self.labels[rest[0]])}"
        return f"logit <b>{html.escape(rest[0])}</b>"


def write(out: Path, data: PageData, summary: dict, image, grid: tuple[int, int], labels: list[str], *,
          thumb_px: int, ct: dict, atlas_dir: Path | None, atlas_note: str | None) -> Path:
    """``out/graph.html`` and its images under ``out/graph-img/``; feature nodes link into ``atlas_dir`` (an
    atlas's folder, wherever it is) when it holds an atlas."""
    img_dir = out / "graph-img"
    img_dir.mkdir(parents=True, exist_ok=True)
    px = thumb_px
    base = center_square(image, px)
    pos = np.arange(len(data.total))
    figs = []
    for name, vals, what in (("total", data.total, "total influence of the nodes at each patch"),
                             ("embedding", data.embedding, "influence of each patch's embedding")):
        heat = RD.heat_grid(pos, vals, grid)
        RD.heatmap_png(img_dir / f"{name}.png", heat, float(np.nanmax(heat)) if np.isfinite(heat).any() else 0.0,
                       px, base)
        figs.append(f"<figure><img src='graph-img/{name}.png' width='{px}' height='{px}' alt='{name} influence'>"
                    f"{html.escape(what)}<br>CLS: {vals[0]:.3g}</figure>")
    Image.fromarray(base).save(img_dir / "image.png")
    figs.insert(0, f"<figure><img src='graph-img/image.png' width='{px}' height='{px}' alt='image'>the image"
                   f"</figure>")
    if atlas_dir is not None and not (atlas_dir / "index.html").is_file():
        atlas_dir = None
    name = NodeNames(labels, out, atlas_dir)

    def path_rows(paths) -> str:
        return "".join(
            f"<tr><td data-v='{s}'>{s:.3g}</td><td class='l'>{' → '.join(name(r) for r in p)}</td></tr>"
            for s, p in paths) or "<tr><td></td><td class='l'>no path over the kept edges</td></tr>"
    feat_rows = [f"<tr data-s='{html.escape(f'L{layer}-F{f} {labels[p]}'.lower())}'>"
                 f"<td class='l'>{name.feature_link(layer, f)}</td><td data-v='{layer}'>{layer}</td>"
                 f"<td class='l' data-v='{p}'>{html.escape(labels[p])}</td>"
                 f"<td data-v='{act}'>{act:.3g}</td><td data-v='{inf}'>{inf:.3g}</td></tr>"
                 for layer, p, f, act, inf in data.kept]
    logit_rows = "".join(f"<tr><td class='l'>{html.escape(c)}</td><td>{prob:.3g}</td><td>{inp:.4g}</td></tr>"
                         for c, prob, inp in data.logits)
    head = ("<table>" + "".join(
        f"<tr><td class='l'>{html.escape(str(k))}</td><td class='l'>{html.escape(_fmt(v))}</td></tr>"
        for k, v in summary.items()) + "</table>")
    ct_links = ("<p>circuit-tracer files: <a href='circuit-tracer/graph.pt'>graph.pt</a> · "
                "<a href='circuit-tracer/graph_files/graph-metadata.json'>graph-metadata.json</a> "
                "(its viewer loads d3 from the web)</p>" if ct.get("json") else
                f"<p class='note'>{html.escape(ct.get('note', ''))}</p>")
    atlas_link = (f"<p><a href='{name.href}/index.html'>atlas</a></p>" if atlas_dir is not None else "") + (
        f"<p class='note'>{html.escape(atlas_note)}</p>" if atlas_note else "")
    body = (f"<h1>Attribution graph: {html.escape(str(summary.get('image')))} → "
            f"{html.escape(data.target)}</h1>{head}{ct_links}{atlas_link}"
            f"<div class='thumbs'>{''.join(figs)}</div>"
            "<h2 id='logits'>Logit nodes</h2><table><tr><th>class</th><th>p</th><th>input (logit − mean)</th></tr>"
            f"{logit_rows}</table>"
            f"<h2 id='paths'>Strongest paths from a patch to the target</h2><table><thead><tr><th>strength</th>"
            f"<th>path</th></tr></thead><tbody>{path_rows(data.patch_paths)}</tbody></table>"
            f"<h2 id='feature-paths'>Strongest paths from a feature to the target</h2><table><thead><tr>"
            f"<th>strength</th><th>path</th></tr></thead><tbody>{path_rows(data.feature_paths)}</tbody></table>"
            f"<h2 id='features'>Kept feature nodes ({len(data.kept)} of {data.n_features})</h2>"
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
