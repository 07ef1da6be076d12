"""Atlas entry points: ``run_atlas`` (the ``clt-pipe atlas`` command) and ``finish_atlas`` (analyze's part,
after analyze's shared streaming pass has fed a ``FeatureScan``).

Shown features: per source layer the ``top_per_layer`` features with the highest score (mean |activation| over
all scanned tokens = firing density × mean activation when firing; ties by index) that fired at all, plus every
``LAYER:FEATURE`` listed explicitly (shown even if it never fired).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from clt_pipe.analyze.atlas import effects as EF
from clt_pipe.analyze.atlas import render as RD
from clt_pipe.analyze.atlas.images import ThumbnailSource
from clt_pipe.analyze.atlas.scan import FeatureScan, stream_inputs, token_activations
from clt_pipe.errors import CltPipeError
from clt_pipe.store import format as SF

ATLAS_DIR = "atlas"


def has_patches(store) -> bool:
    return store.meta.tokens.policy.kind != "cls"  # patches, all and cls+K (K ≥ 1) all store patch slots


def parse_features(specs: list[str], n_layers: int, n_features: int) -> list[tuple[int, int]]:
    out = []
    for s in specs:
        layer, f = (int(v) for v in s.split(":"))
        if not (0 <= layer < n_layers and 0 <= f < n_features):
            raise CltPipeError(f"atlas: feature {s} is outside the CLT ({n_layers} layers × {n_features} features)")
        out.append((layer, f))
    return list(dict.fromkeys(out))


def select_features(scan: dict, top_per_layer: int, listed: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    score = scan["score"]
    chosen: list[tuple[int, int, bool]] = []
    for layer in range(score.shape[0]):
        order = np.argsort(-score[layer], kind="stable")[:top_per_layer]
        top = [int(f) for f in order if score[layer, f] > 0]
        mine = sorted(f for (lay, f) in listed if lay == layer and f not in top)
        chosen += [(layer, f, (layer, f) in listed) for f in top] + [(layer, f, True) for f in mine]
    return chosen


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def finish_atlas(store, clt, scan: dict, out: str | Path, *, listed: list[str], top_per_layer: int,
                 template_set: str, device, thumb_px: int = 96, data_root: str = "", read_threads: int = 4,
                 store_url: str = "", clt_path: str = "", dataset=None) -> dict:
    """Select the features, gather their heatmaps, render ``OUT/atlas/``; returns a small summary dict."""
    t0 = time.perf_counter()
    L, F = clt.spec.n_layers, clt.spec.n_features
    chosen = select_features(scan, top_per_layer, parse_features(listed, L, F))
    root = Path(out) / ATLAS_DIR
    if root.exists():
        shutil.rmtree(root)  # a stale page of a feature no longer shown would be a dangling, misleading file
    (root / "img").mkdir(parents=True)
    wanted = {}
    for layer, f, _ in chosen:
        imgs = [int(i) for i, v in zip(scan["top_img"][layer, f], scan["top_val"][layer, f]) if v > 0 and i >= 0]
        wanted[(layer, f)] = imgs
    acts = token_activations(store, clt, {k: v for k, v in wanted.items() if v}, device, read_threads)
    n_patches = max(int(store.model.get("n_positions", 0)) - 1,
                    max((int(p.max()) for p, _ in acts.values()), default=0))
    grid = RD.patch_grid(store.model, n_patches)
    shown = sorted({i for imgs in wanted.values() for i in imgs})
    thumbs = ThumbnailSource(store, shown, data_root, dataset)
    lens = EF.LogitLens(store, template_set)
    # per-image arrays are read for the shown images only: nothing here grows with the store
    held = store.per_image_if_read(SF.LABELS)
    some = np.array(shown, np.int64)
    labels = dict(zip(shown, (held[some] if held is not None else store.array(SF.LABELS).get_coordinate_selection(some))
                      if shown else []))
    names = store.class_names
    nt = scan["n_tokens"]
    features, pixel_cache = [], {}
    for layer, f, is_listed in chosen:
        fid = RD.feature_id(layer, f)
        fired = {t: float(scan["fired"][t][layer, f]) for t in ("cls", "patches")}
        mass = {t: float(scan["mass"][t][layer, f]) for t in ("cls", "patches")}
        tops = wanted[(layer, f)]
        vmax = max([float(acts[(layer, f, i)][1].max()) for i in tops] + [0.0])
        images = []
        for rank, i in enumerate(tops):
            pos, a = acts[(layer, f, i)]
            if i not in pixel_cache:
                pixel_cache[i] = thumbs.pixels(i, thumb_px)
            png = f"img/{fid}-{rank}.png"
            RD.heatmap_png(root / png, RD.heat_grid(pos, a, grid), vmax, thumb_px, pixel_cache[i])
            cls = a[pos == 0]
            lab = int(labels[i])
            images.append({"image": i, "label": lab, "class": names[lab] if 0 <= lab < len(names) else "–",
                           "max_act": float(a.max()), "cls_act": float(cls[0]) if len(cls) else float("nan"),
                           "png": png, "px": thumb_px, "pixels": pixel_cache[i] is not None,
                           "heat_peak_patch": int(pos[np.argmax(np.where(pos > 0, a, -1))]) if (pos > 0).any()
                           else None})
        features.append({
            "layer": layer, "feature": f, "listed": is_listed, "score": float(scan["score"][layer, f]),
            "density_cls": _ratio(fired["cls"], nt["cls"]), "density_patches": _ratio(fired["patches"], nt["patches"]),
            "mean_act_cls": _ratio(mass["cls"], fired["cls"]),
            "mean_act_patches": _ratio(mass["patches"], fired["patches"]),
            "footprint": [float(v) for v in EF.footprint(clt, layer, f)],
            "logits": lens.feature_effects(clt, layer, f), "images": images,
        })
    atlas = {"store": store_url, "clt": clt_path, "n_layers": L, "n_features": F, "n_tokens": nt,
             "n_images": scan["n_images"], "template_set": template_set, "grid": list(grid),
             "score": "mean |activation| over all scanned tokens (density × mean activation when firing)",
             "images_note": thumbs.problems(), "features": features}
    index = RD.write_pages(root, atlas)
    return {"index": str(index), "dir": str(root), "n_features": len(features), "thumbnails": thumbs.problems()
            is None, "images_note": thumbs.problems(), "render_s": time.perf_counter() - t0}


def run_atlas(cfg, console=None) -> dict:
    """``clt-pipe atlas``: scan the store once, then render the atlas for an existing run."""
    from clt_pipe.outdir import hold_out_dir

    with hold_out_dir(cfg.out, "atlas"):
        return _atlas(cfg, console)


def _atlas(cfg, console) -> dict:
    from clt_pipe.analyze.inputs import check_clt_matches_store
    from clt_pipe.clt.rundir import load_fitted
    from clt_pipe.device import resolve_device
    from clt_pipe.progress import NullProgress, RichProgress
    from clt_pipe.store.reader import ActivationStore

    t0 = time.perf_counter()
    store = ActivationStore(cfg.store)
    clt, run_meta = load_fitted(cfg.clt)
    check_clt_matches_store(store, clt, run_meta)
    if not has_patches(store):
        raise CltPipeError(f"atlas: the store ({store.meta.tokens.policy} tokens) holds no patch tokens, "
                           f"so there is nothing to draw a heatmap from")
    parse_features(cfg.features, clt.spec.n_layers, clt.spec.n_features)  # fail before the pass
    store.text_classifier(cfg.template_set)  # an unknown set fails here, with the store's one-line error
    device = resolve_device(cfg.device)
    clt = clt.to(device).eval()
    scan = FeatureScan(clt, cfg.top_images)
    progress = RichProgress(console) if console is not None else NullProgress()
    lay = store.layout
    n_chunks = lay.n_chunks if not cfg.max_tokens else min(lay.n_chunks, -(-cfg.max_tokens // lay.rows_per_chunk))
    t_scan = time.perf_counter()
    progress.start("atlas: scan", n_chunks)
    try:
        with torch.inference_mode():
            for batch in stream_inputs(store, device, cfg.max_tokens, cfg.read_threads):
                scan.update(batch)
                progress.advance(1, rows=batch.x.shape[0])
    finally:
        progress.stop()
    t_scan = time.perf_counter() - t_scan
    with torch.inference_mode():
        summary = finish_atlas(store, clt, scan.result(), cfg.out, listed=cfg.features,
                               top_per_layer=cfg.top_per_layer, template_set=cfg.template_set, device=device,
                               thumb_px=cfg.thumb_px, data_root=cfg.data_root, read_threads=cfg.read_threads,
                               store_url=cfg.store, clt_path=cfg.clt)
    summary["scan_s"] = t_scan
    summary["seconds"] = time.perf_counter() - t0
    return summary
