"""`clt-pipe graph`: load the store's ViT, the CLT and one image; build, check, prune and write its graph."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clt_pipe.config import AtlasConfig, GraphConfig, build
from clt_pipe.datasets.base import DatasetError
from clt_pipe.precision import exact_float32
from clt_pipe.errors import CltPipeError
from clt_pipe.analyze.graph import attribution as AT
from clt_pipe.analyze.graph import ctfiles, page
from clt_pipe.analyze.graph import prune as PR

GRAPH_JSON = "graph.json"


def load_image(cfg: GraphConfig, store, data_root: str = ""):
    """(PIL image, store index or None, label or -1, how it was found) for ``cfg.image``."""
    from PIL import Image

    spec = cfg.image.strip()
    if spec.isdigit():
        return store_images(store, [int(spec)], data_root)[int(spec)]
    path = Path(spec)
    if not path.is_file():
        raise CltPipeError(f"graph: --image {spec!r} is neither a store image index nor an image file")
    try:
        return Image.open(path).convert("RGB"), None, -1, str(path)
    except OSError as e:
        raise CltPipeError(f"graph: --image {spec}: cannot read it as an image ({e})") from None


def store_images(store, indices: list[int], data_root: str = "") -> dict[int, tuple]:
    """{index: (PIL image, index, label, how it was found)} of store images, the dataset opened and
    images.parquet read once for all of them; each checked to be the store's own image."""
    from clt_pipe.analyze.atlas.images import _sources
    from clt_pipe.datasets.registry import open_dataset

    n = store.layout.n_images
    for i in indices:
        if i >= n:
            raise CltPipeError(f"graph: --image {i} is outside the store ({n} images)")
        if not bool(store.image_ok[i]):
            raise CltPipeError(f"graph: image {i} was not harvested (image_ok is false in the store)")
    ds = store.meta.dataset
    root = data_root or ds.data_root or ""
    try:
        dataset = open_dataset(ds.name, root, ds.split, coco_label_rule=ds.coco_label_rule or "largest_area")
    except DatasetError as e:
        raise CltPipeError(f"graph: image {indices[0]} cannot be read from the store's dataset ({e}); pass "
                           f"--data-root (the folder the store's {ds.name} images are in now)") from None
    sources = _sources(store, list(indices))
    out = {}
    for i in indices:
        source = sources.get(i)
        if i >= len(dataset) or dataset.record(i).source != source:
            raise CltPipeError(f"graph: image {i} of {ds.name}/{ds.split} at {root or '(no data root)'} is not "
                               f"the store's image {i} (images.parquet names {source!r}); pass --data-root")
        out[i] = (dataset.load_image(i), i, int(store.labels[i]), f"store image {i} ({source})")
    return out


def class_index(spec: str, names: list[str], what: str) -> int | None:
    if not spec:
        return None
    if spec in names:
        return names.index(spec)
    if spec.isdigit() and int(spec) < len(names):
        return int(spec)
    raise CltPipeError(f"graph: --{what} {spec!r} is not a class of the store ({len(names)} classes, e.g. "
                       f"{', '.join(names[:5])})")


def trained_positions(run_meta: dict, n_pos: int) -> tuple[torch.Tensor | None, str]:
    """([P] bool of the positions whose MLP rows the CLT was trained on, or None for all; what it means).

    The rows a fit saw are its store's token policy (cls, patches, all, cls+K: CLS and K random patches, so over
    the data every patch position) filtered by the fit's ``tokens``; a feature read elsewhere is off-distribution.
    """
    policy = str(((run_meta.get("store") or {}).get("tokens") or {}).get("policy", "all"))
    fit_rows = str((run_meta.get("config") or {}).get("tokens", "all"))
    cls = policy in ("cls", "all") or policy.startswith("cls+")
    patches = policy != "cls"
    cls, patches = cls and fit_rows in ("cls", "all"), patches and fit_rows in ("patches", "all")
    if cls and patches:
        return None, "every position"
    mask = torch.zeros(n_pos, dtype=torch.bool)
    mask[0], mask[1:] = cls, patches
    where = "CLS only" if cls else "patches only" if patches else "none"
    return mask, (f"{where}: the CLT was trained on {policy} tokens of its store (fit tokens = {fit_rows}), so the "
                  f"MLP outputs at other positions are left whole in the error nodes")


def targets(cfg: GraphConfig, names: list[str]) -> tuple[int | None, int | None]:
    """(target class, versus class) of ``cfg``, each None when not given."""
    target, versus = class_index(cfg.target, names, "target"), class_index(cfg.versus, names, "versus")
    if versus is not None and target is None:
        raise CltPipeError("graph: --versus needs --target (the class it is compared with)")
    if versus is not None and versus == target:
        raise CltPipeError("graph: --target and --versus name the same class")
    return target, versus


def load_backbone_of(store, device):
    from clt_pipe.backbone.loading import load_backbone

    m = store.meta.model
    bb = load_backbone(m.model_arg, m.pretrained, device)
    if bb.identity.weights_sha256 != m.weights_sha256:
        raise CltPipeError(f"graph: weights {m.pretrained!r} now hash to {bb.identity.weights_sha256[:12]}, the "
                           f"store was harvested with {m.weights_sha256[:12]}")
    return bb


def position_labels(n_pos: int, grid: tuple[int, int]) -> list[str]:
    gw = grid[1]
    return ["CLS"] + [f"patch r{(p - 1) // gw} c{(p - 1) % gw}" for p in range(1, n_pos)]


@dataclass
class ImageGraph:
    """One image's graph once built, pruned and written to circuit-tracer's files: what its page and
    ``graph.json`` still need (the dense adjacency is not kept)."""

    out: Path
    image: object  # PIL image
    index: int | None
    slug: str
    summary: dict
    data: page.PageData
    detail: dict
    ct: dict

    @property
    def features(self) -> list[str]:
        """The kept feature nodes as LAYER:FEATURE (atlas ``--features``)."""
        return sorted({f"{layer}:{f}" for layer, _, f, _, _ in self.data.kept})


class GraphBuilder:
    """What every graph over one store and CLT shares: the store's classes and text head, its ViT (weights
    checked against the store's hash), the CLT on the device."""

    def __init__(self, store, clt, device: torch.device, template_set: str, data_root: str = "", backbone=None,
                 run_meta: dict | None = None):
        from clt_pipe.analyze import zeroshot as ZS

        self.store, self.device, self.data_root, self.run_meta = store, device, data_root, run_meta or {}
        self.clt = clt.to(device).eval()
        self.names = list(store.class_names)
        self.classifier = torch.from_numpy(store.text_classifier(template_set)).float().to(device)
        self.logit_scale = ZS.logit_scale(store)
        self.bb = backbone if backbone is not None else load_backbone_of(store, device)

    @exact_float32()  # the reference logits too, not only the graph: both are compared in float32
    def build(self, cfg: GraphConfig, out: Path, image=None) -> ImageGraph:
        """Build ``cfg.image``'s graph (or ``image``, a (PIL, index, label, where) already loaded), check it,
        prune it, write circuit-tracer's files into ``out``."""
        from clt_pipe.analyze import zeroshot as ZS
        from clt_pipe.analyze.atlas.render import patch_grid
        from clt_pipe.analyze.graph.replacement import Replacement, capture

        names, store = self.names, self.store
        target, versus = targets(cfg, names)
        pil, index, label, where = image or load_image(cfg, store, self.data_root)
        pixels = self.bb.preprocess(pil).to(self.device)
        t1 = time.perf_counter()
        cap, W = capture(self.bb.visual, pixels)
        rep = Replacement(cap, W, self.classifier, self.logit_scale)
        positions, positions_text = trained_positions(self.run_meta, cap.emb.shape[0])
        graph = AT.build_graph(rep, self.clt, names, target, versus, cfg.batch_size, cfg.max_n_logits,
                               cfg.desired_logit_prob, positions)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_attr = time.perf_counter() - t1
        completeness = graph.completeness_error()
        with torch.no_grad():
            real = ZS.classify(self.bb.model.encode_image(pixels[None]).float(), self.classifier,
                               rep.logit_scale)[0]
            replayed = AT.replacement_logits(rep, graph, self.clt)
        t2 = time.perf_counter()
        pruned = PR.prune(graph.adjacency, graph.target_weights, graph.n_features, graph.n_pos,
                          cfg.node_threshold, cfg.edge_threshold)
        t_prune = time.perf_counter() - t2
        scores = PR.graph_scores(graph.adjacency, pruned.influence, graph.target_weights,
                                 slice(graph.error_start, graph.token_start),
                                 slice(graph.token_start, graph.logit_start))
        grid = patch_grid(store.model, graph.n_pos - 1)
        labels = position_labels(graph.n_pos, grid)
        slug = f"image-{index}" if index is not None else Path(cfg.image).stem
        out.mkdir(parents=True, exist_ok=True)
        ct = ctfiles.write(graph, pruned, out, slug, labels, model_name=store.model.get("name", ""),
                           scan=Path(cfg.clt).name, d_mlp=int(store.model.get("d_mlp", 0)), n_heads=W.n_heads,
                           node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
        summary = {
            "image": where, "store_index": index, "label": names[label] if 0 <= label < len(names) else None,
            "predicted": names[int(real.argmax())] if names else int(real.argmax()),
            "target": graph.logit_nodes[0].label, "completeness error": completeness,
            "replacement logits max |diff| vs encode_image": float((replayed - real).abs().max()),
            "logits max |diff| (own forward vs encode_image)": float((graph.logits - real).abs().max()),
            "nodes": graph.n_nodes, "feature nodes": graph.n_features, "feature positions": positions_text,
            "edges (non-zero)": int((graph.adjacency != 0).sum()),
            "kept nodes": int(pruned.node_mask.sum()),
            "kept feature nodes": int(pruned.node_mask[:graph.n_features].sum()),
            "kept edges": int(pruned.edge_mask.sum()),
            "replacement score": scores["replacement"], "completeness score": scores["completeness"],
            "attribution_s": t_attr, "prune_s": t_prune, "device": str(self.device), "batch_size": cfg.batch_size,
        }
        data = page.page_data(graph, pruned, cfg.paths)
        detail = {"grid": list(grid), "positions": labels,
                  "patch_influence_total": data.total.tolist(), "patch_influence_embedding": data.embedding.tolist(),
                  "kept_features": [{"layer": la, "position": p, "feature": f, "activation": a, "influence": v}
                                    for la, p, f, a, v in data.kept],
                  "logit_nodes": [{"label": n.label, "index": n.index, "prob": n.prob} for n in graph.logit_nodes]}
        return ImageGraph(out, pil, index, slug, summary, data, detail, ct)

    def write(self, ig: ImageGraph, cfg: GraphConfig, atlas_dir: Path | None, atlas_note: str | None) -> dict:
        """The page and ``graph.json`` of a built graph; returns its summary (with the page's path)."""
        summary = dict(ig.summary)
        pg = page.write(ig.out, ig.data, summary, ig.image, tuple(ig.detail["grid"]), ig.detail["positions"],
                        thumb_px=cfg.thumb_px, ct=ig.ct, atlas_dir=atlas_dir, atlas_note=atlas_note)
        summary["page"] = str(pg)
        summary["circuit_tracer"] = ig.ct.get("json") or ig.ct.get("note")
        # graph.json names its files relative to its folder: the folder can move (a report staged, then renamed
        # into place; a teammate's copy) and still point at them
        rel = {"page": page.PAGE,
               "circuit_tracer": os.path.relpath(ig.ct["json"], ig.out) if ig.ct.get("json") else ig.ct.get("note")}
        (ig.out / GRAPH_JSON).write_text(json.dumps({**_jsonable({**summary, **rel}), **ig.detail}, indent=1))
        return summary


def run_graph(cfg: GraphConfig, console=None) -> dict:
    from clt_pipe.analyze.inputs import check_clt_matches_store
    from clt_pipe.clt.rundir import load_fitted
    from clt_pipe.device import resolve_device
    from clt_pipe.outdir import hold_out_dir
    from clt_pipe.store.reader import ActivationStore

    t0 = time.perf_counter()
    log = console.print if console is not None else (lambda *a, **k: None)
    store = ActivationStore(cfg.store)
    clt, run_meta = load_fitted(cfg.clt)
    check_clt_matches_store(store, clt, run_meta)
    targets(cfg, list(store.class_names))  # a bad class fails before the ViT loads
    image = load_image(cfg, store, cfg.data_root)
    device = resolve_device(cfg.device)
    builder = GraphBuilder(store, clt, device, cfg.template_set, cfg.data_root, run_meta=run_meta)
    t_load = time.perf_counter() - t0
    out = Path(cfg.out)
    with hold_out_dir(out, "graph"):  # one writer per output folder (the atlas inside re-enters it)
        foreign = (out / "atlas" / "index.html").is_file() and not (out / GRAPH_JSON).is_file()
        ig = builder.build(cfg, out, image)
        atlas_note = None
        if cfg.atlas and foreign:  # an analyze/atlas run's atlas: never replaced, linked where it has the page
            atlas_note = (f"{out / 'atlas'} was written by another run and is kept as it is: features without a "
                          f"page there are not linked")
        elif cfg.atlas and ig.data.kept:
            from clt_pipe.analyze.atlas.run import run_atlas

            acfg = build(AtlasConfig, {"store": cfg.store, "clt": cfg.clt, "out": str(out), "data_root": cfg.data_root,
                                       "features": ig.features, "top_per_layer": 0, "top_images": cfg.top_images,
                                       "template_set": cfg.template_set, "max_tokens": cfg.atlas_max_tokens,
                                       "device": str(device), "read_threads": cfg.read_threads})
            run_atlas(acfg)
        elif cfg.atlas:
            atlas_note = "no feature node survived the pruning: no atlas pages"
        else:
            atlas_note = "atlas pages not written (--no-atlas)"
        ig.summary["load_s"] = t_load
        summary = builder.write(ig, cfg, out / "atlas", atlas_note)
        summary["seconds"] = time.perf_counter() - t0
    log(f"graph: completeness error {summary['completeness error']:.3g}")
    return summary


def _jsonable(d: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in d.items()}
