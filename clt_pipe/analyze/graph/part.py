"""The ``graphs`` part of ``clt-pipe analyze``: attribution graphs of a few chosen images, beside the report.

Each graph is ``clt-pipe graph``'s (same builder, same defaults, same files) written to
``OUT/graphs/image-<i>/``; its feature nodes link to the report's atlas, to which the part adds every kept
feature (so each has a page). The graphs are built before the atlas's pass over the store and their pages
written after it; between the two only the small page data is held, not the N × N adjacencies.

Images are store indices or class names (a class name picks the first evaluated image of that class; a bare
value that names a class is the class, as ``clt-pipe graph --target`` reads it; ``image:N`` and ``class:NAME``
say which is meant); none given, ``graph_count`` classes spread evenly over the class list, each by its first
evaluated image. The graphs are staged in ``OUT/graphs.partial/`` and renamed into place when their pages are
written, just before the report: a run that fails or stops leaves the previous report's graphs as they were.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from clt_pipe import signals
from clt_pipe.analyze import zeroshot as ZS
from clt_pipe.analyze.graph.run import GraphBuilder, store_images
from clt_pipe.config import AnalyzeConfig, GraphConfig, build
from clt_pipe.errors import CltPipeError

GRAPHS_DIR = "graphs"
STAGE_DIR = "graphs.partial"


def choose_images(store, specs: list[str], count: int) -> tuple[list[int], str]:
    """(store image indices, how they were chosen)."""
    idx = ZS.eval_images(store)
    labels = store.labels[idx]
    names = list(store.class_names)

    def first_of(c: int) -> int | None:
        hit = np.flatnonzero(labels == c)
        return int(idx[hit[0]]) if len(hit) else None

    if not specs:
        present = np.unique(labels)
        if not len(present):
            raise CltPipeError("graphs: the store has no labelled, harvested image to choose from")
        picks = np.unique(np.linspace(0, len(present) - 1, min(count, len(present))).round().astype(int))
        chosen = [first_of(int(present[p])) for p in picks]
        return chosen, f"the first evaluated image of {len(chosen)} classes spread over the class list"
    chosen = []
    for spec in specs:
        kind, _, s = spec.partition(":") if spec.startswith(("image:", "class:")) else ("", "", spec)
        if kind == "image" or (not kind and s.isdigit() and s not in names):
            if not s.isdigit():
                raise CltPipeError(f"graph_images: {spec!r}: image: takes a store image index")
            i = int(s)
            if i >= store.layout.n_images:
                raise CltPipeError(f"graph_images: {i} is outside the store ({store.layout.n_images} images)")
            if not bool(store.image_ok[i]):
                raise CltPipeError(f"graph_images: image {i} was not harvested (image_ok is false in the store)")
            chosen.append(i)
        elif s in names:  # a bare class name, or class:NAME
            i = first_of(names.index(s))
            if i is None:
                raise CltPipeError(f"graph_images: the store has no evaluated image of class {s!r}")
            chosen.append(i)
        else:
            raise CltPipeError(f"graph_images: {spec!r} is neither a store image index nor a class of the store "
                               f"({len(names)} classes, e.g. {', '.join(names[:5])})")
    return list(dict.fromkeys(chosen)), "the images given by graph_images"


def graph_config(cfg: AnalyzeConfig, index: int = 0) -> GraphConfig:
    """``clt-pipe graph``'s settings for one image of the part (its defaults, analyze's shared options)."""
    return build(GraphConfig, {"store": cfg.store, "clt": cfg.clt, "image": str(index), "atlas": False,
                               "template_set": cfg.template_set, "data_root": cfg.data_root, "device": cfg.device,
                               "batch_size": cfg.graph_batch_size, "read_threads": cfg.read_threads})


class GraphsPart:
    """Built in two steps around the atlas's pass: ``build`` (graphs, circuit-tracer files) and ``finish``
    (pages linked to the atlas, the part's result)."""

    def __init__(self, cfg: AnalyzeConfig, store, clt, device, backbone=None, run_meta: dict | None = None):
        self.cfg, self.root, self.stage = cfg, Path(cfg.out) / GRAPHS_DIR, Path(cfg.out) / STAGE_DIR
        self.gcfg = graph_config(cfg)
        self.indices, self.rule = choose_images(store, cfg.graph_images, cfg.graph_count)
        # every image read now: a data root without them fails here, before the ViT loads and any long pass
        self.images = store_images(store, self.indices, cfg.data_root)
        self.builder = GraphBuilder(store, clt, device, cfg.template_set, cfg.data_root, backbone, run_meta)
        self.built: list = []
        self.seconds = 0.0

    def build(self) -> None:
        t0 = time.perf_counter()
        if self.stage.exists():
            shutil.rmtree(self.stage)  # what a failed or stopped run left
        for i in self.indices:
            self.built.append(self.builder.build(replace(self.gcfg, image=str(i)), self.stage / f"image-{i}",
                                                 self.images[i]))
        self.seconds = time.perf_counter() - t0

    @property
    def features(self) -> list[str]:
        """Every graph's kept feature nodes as LAYER:FEATURE, for the atlas's listed features."""
        return sorted({f for g in self.built for f in g.features}, key=lambda s: tuple(map(int, s.split(":"))))

    def finish(self, atlas_dir: Path | None) -> dict:
        t0 = time.perf_counter()
        note = None if atlas_dir is not None else "the atlas part did not run: feature nodes are not linked"
        rows = []
        for g in self.built:
            s = self.builder.write(g, replace(self.gcfg, image=str(g.index)), atlas_dir, note)
            rows.append({
                "image": g.index, "label": s["label"], "predicted": s["predicted"], "target": s["target"],
                "completeness_error": s["completeness error"],
                "logits_max_abs_diff": s["replacement logits max |diff| vs encode_image"],
                "replacement_score": s["replacement score"], "completeness_score": s["completeness score"],
                "feature_nodes": s["feature nodes"], "kept_feature_nodes": s["kept feature nodes"],
                "kept_edges": s["kept edges"],
                "top_features": [f"L{f['layer']}-F{f['feature']} @ {g.detail['positions'][f['position']]}"
                                 for f in g.detail["kept_features"][:3]],
                "page": str(Path(GRAPHS_DIR) / f"image-{g.index}" / "graph.html"),
                "heatmap": str(Path(GRAPHS_DIR) / f"image-{g.index}" / "graph-img" / "total.png"),
                "feature_positions": s["feature positions"], "attribution_s": s["attribution_s"],
            })
        with signals.stop_point():  # never between the two: no graphs at all where the old report points
            if self.root.exists():
                shutil.rmtree(self.root)  # graphs of images no longer chosen would be stale, misleading pages
            self.stage.rename(self.root)
        gc = self.gcfg
        return {"chosen": self.rule, "rows": rows, "atlas_linked": atlas_dir is not None,
                "settings": {k: getattr(gc, k) for k in ("node_threshold", "edge_threshold", "max_n_logits",
                                                         "desired_logit_prob", "batch_size")},
                "seconds": self.seconds + time.perf_counter() - t0}
