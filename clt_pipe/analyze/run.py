"""`clt-pipe analyze`: validate inputs, run the selected parts, write the report.

Cache-only parts (fidelity, attribution, openloop, retrieval) share one streamed pass over the store's chunks.
Closed-loop parts (closedloop, ablation) re-run the ViT on the store's images. An ablation ranked by
attribution (or fvu) computes that part too even when it was not selected (recorded in ``report.json``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from clt_pipe.analyze import ablation as AB
from clt_pipe.analyze import attribution as AT
from clt_pipe.analyze import report as R
from clt_pipe.analyze import retrieval as RT
from clt_pipe.analyze import substitution as SU
from clt_pipe.analyze import zeroshot as ZS
from clt_pipe.analyze.fidelity import FidelityAccumulator, iter_chunks
from clt_pipe.atlas import run as ATL
from clt_pipe.atlas.scan import FeatureScan
from clt_pipe.backbone.loading import load_backbone, resolve_device
from clt_pipe.config import AnalyzeConfig, to_dict
from clt_pipe.errors import CltPipeError
from clt_pipe.fit.checkpoint import load_fitted
from clt_pipe.progress import NullProgress, RichProgress
from clt_pipe.store.reader import ActivationStore

IDENTITY_KEYS = ("name", "weights_sha256", "n_layers", "d_model")


def _describe_model(m: dict) -> str:
    sha = str(m.get("weights_sha256", "?"))
    return f"{m.get('name', '?')} ({m.get('n_layers', '?')} layers × {m.get('d_model', '?')}, weights {sha[:12]})"


def check_clt_matches_store(store: ActivationStore, clt, run_meta: dict) -> None:
    trained = dict((run_meta.get("store") or {}).get("model") or {})
    trained.setdefault("n_layers", clt.spec.n_layers)
    trained.setdefault("d_model", clt.spec.d_model)
    held = store.model
    spec_ok = clt.spec.n_layers == store.n_layers and clt.spec.d_model == store.d_model
    ident_ok = all(trained.get(k) == held.get(k) for k in IDENTITY_KEYS if k in trained)
    if not (spec_ok and ident_ok):
        raise CltPipeError(f"CLT trained on {_describe_model(trained)} (CLT spec {clt.spec.n_layers} layers × "
                           f"{clt.spec.d_model}) but store holds {_describe_model(held)}; analyse it with a store "
                           f"of the same model")


def closed_loop_inputs(cfg: AnalyzeConfig, store: ActivationStore, device: torch.device):
    """(dataset, backbone, image indices, labels) for the closed-loop parts, or a clear CltPipeError."""
    from clt_pipe.datasets.registry import open_dataset

    ds_meta = store.meta["dataset"]
    name = ds_meta["name"]
    split = cfg.split or ds_meta["split"]
    if name != "digits" and not cfg.data_root:
        raise CltPipeError(f"closedloop/ablation re-run the ViT on the store's {name} images: pass --data-root "
                           f"(the store was harvested from {ds_meta.get('data_root') or '?'}), or leave them out "
                           f"with --only")
    m = store.model
    bb = load_backbone(m["model_arg"], m["pretrained"], device)
    if bb.identity["weights_sha256"] != m["weights_sha256"]:
        raise CltPipeError(f"closedloop/ablation: weights {m['pretrained']!r} now hash to "
                           f"{bb.identity['weights_sha256'][:12]}, the store was harvested with "
                           f"{m['weights_sha256'][:12]}")
    dataset = open_dataset(name, cfg.data_root, split,
                           coco_label_rule=ds_meta.get("coco_label_rule") or "largest_area")
    if split == ds_meta["split"]:
        idx = ZS.eval_images(store)
        if cfg.max_images:
            idx = idx[:cfg.max_images]
        if len(idx) and idx.max() >= len(dataset):
            raise CltPipeError(f"closedloop: {cfg.data_root} holds {len(dataset)} {name}/{split} images, the store "
                               f"{store.layout.n_images}")
        labels = store.labels[idx]
        got = np.array([dataset.record(int(i)).label for i in idx])
        if not np.array_equal(got, labels):
            bad = int(np.flatnonzero(got != labels)[0])
            raise CltPipeError(f"closedloop: image {int(idx[bad])} of {cfg.data_root} has label {got[bad]}, the "
                               f"store {labels[bad]}: the data root holds other images than the store")
    else:
        n = min(len(dataset), cfg.max_images) if cfg.max_images else len(dataset)
        idx = np.arange(n)
        labels = np.array([dataset.record(int(i)).label for i in idx])
        keep = labels >= 0
        idx, labels = idx[keep], labels[keep]
    if len(idx) == 0:
        raise CltPipeError("closedloop: no labelled images to evaluate")
    return dataset, bb, idx, labels


def _retrieval_dataset(cfg: AnalyzeConfig, store: ActivationStore):
    """The dataset for retrieval image grids, or None (then grids show indices and labels)."""
    from clt_pipe.datasets.registry import open_dataset

    ds = store.meta["dataset"]
    root = cfg.data_root or ds.get("data_root", "")
    try:
        dataset = open_dataset(ds["name"], root, ds["split"])
        if len(dataset) < store.layout.n_images:
            return None
        return dataset
    except CltPipeError:
        return None


def run_analyze(cfg: AnalyzeConfig, console=None) -> dict:
    t_start = time.perf_counter()
    progress = RichProgress(console) if console is not None else NullProgress()
    store = ActivationStore(cfg.store)
    clt, run_meta = load_fitted(cfg.clt)
    check_clt_matches_store(store, clt, run_meta)
    device = resolve_device(cfg.device)
    clt = clt.to(device).eval()
    L = store.n_layers
    parts = list(dict.fromkeys(cfg.only))
    need = set(parts)
    notes: list[str] = []
    if "ablation" in need:
        dep = "attribution" if cfg.ablation_rank == "attribution" else "fidelity"
        if dep not in need:
            need.add(dep)
            notes.append(f"ablation ranks by {cfg.ablation_rank}: computed the {dep} part for it")
    windows = ZS.parse_windows(cfg.windows, L)
    if any(w["rescaled"] for w in windows):
        notes.append(f"windows rescaled to the store's {L} layers: " +
                     ", ".join(f"{w['requested']}→{w['name']}" for w in windows))
    has_cls = bool((store.token_index == 0).any())
    if ("openloop" in need or "retrieval" in need) and not has_cls:
        raise CltPipeError(f"openloop/retrieval use the CLS token but the store ({store.meta['tokens']['policy']} "
                           f"tokens) has no CLS slots; leave them out with --only")
    if "ablation" in need and cfg.ablation_rank == "attribution" and not has_cls:
        raise CltPipeError("ablation: CLS attribution needs CLS slots and the store has none")
    if "atlas" in need and not ATL.has_patches(store):
        need.discard("atlas")
        notes.append(f"atlas skipped: the store ({store.meta['tokens']['policy']} tokens) has no patch tokens")
    if "atlas" in need:
        ATL.parse_features(cfg.atlas_features, clt.spec.n_layers, clt.spec.n_features)  # fail before the pass
    cl = None
    if need & {"closedloop", "ablation"}:
        cl = closed_loop_inputs(cfg, store, device)  # fail before the long streaming pass

    results: dict = {"parts": parts, "computed": sorted(need), "notes": notes, "windows": windows}
    timings: dict[str, float] = {}
    with torch.inference_mode():
        if "zeroshot" in need:
            t0 = time.perf_counter()
            base = ZS.baseline(store, cfg.template_set, device)
            results["zeroshot"] = {k: v for k, v in base.items() if k not in ("predictions", "images")}
            timings["zeroshot"] = time.perf_counter() - t0

        accs: dict = {}
        if "fidelity" in need:
            accs["fidelity"] = FidelityAccumulator(clt, store.stats()["var_out"])
        if "attribution" in need:
            accs["attribution"] = AT.AttributionAccumulator(clt)
        if "openloop" in need:
            accs["openloop"] = ZS.OpenLoopAccumulator(store, clt, windows, cfg.template_set,
                                                      cfg.sources_before_window, device)
        if "retrieval" in need:
            accs["retrieval"] = RT.RetrievalAccumulator(store, clt, device, cfg.retrieval_queries, cfg.retrieval_k,
                                                        read_threads=cfg.read_threads)
        if "atlas" in need:
            accs["atlas"] = FeatureScan(clt, cfg.atlas_top_images)
        if accs:
            t0 = time.perf_counter()
            lay = store.layout
            n_chunks = lay.n_chunks if not cfg.max_tokens else min(
                lay.n_chunks, -(-cfg.max_tokens // lay.rows_per_chunk))
            progress.start("analyze: " + " + ".join(accs), n_chunks)
            try:
                for batch in iter_chunks(store, device, cfg.max_tokens, cfg.read_threads):
                    for a in accs.values():
                        a.update(batch)
                    progress.advance(1, rows=batch.x.shape[0])
            finally:
                progress.stop()
            timings["stream"] = time.perf_counter() - t0
            for name, a in accs.items():
                results[name] = a.result()
            if "atlas" in results:
                results["atlas"] = ATL.finish_atlas(
                    store, clt, results["atlas"], cfg.out, listed=cfg.atlas_features,
                    top_per_layer=cfg.atlas_top_per_layer, template_set=cfg.template_set, device=device,
                    data_root=cfg.data_root, read_threads=cfg.read_threads, store_url=cfg.store, clt_path=cfg.clt)
                results["atlas"]["scan_s"] = accs["atlas"].seconds
                timings["atlas"] = accs["atlas"].seconds + results["atlas"]["render_s"]
            if "fidelity" in results and not results["fidelity"]["per_layer"]:
                raise CltPipeError("fidelity: no valid token rows were evaluated (empty token selection)")

        if cl is not None:
            dataset, bb, idx, labels = cl
            clf = store.text_classifier(cfg.template_set)
            scale = ZS.logit_scale(store)
            plans: list[SU.Plan] = []
            if "closedloop" in need:
                for tokens in cfg.window_tokens:
                    for w in windows:
                        p = SU.window_plan(tokens, w["first"], w["last"], cfg.sources_before_window)
                        p.meta = {"window": w["name"], "requested": w["requested"], "first": w["first"],
                                  "last": w["last"]}
                        plans.append(p)
            abl_plans: list[SU.Plan] = []
            ranking: dict = {}
            if "ablation" in need:
                for tokens in AB.ABLATION_TOKENS:
                    order, scores = AB.rank_layers(cfg.ablation_rank, tokens, results.get("attribution"),
                                                   (results.get("fidelity") or {}).get("per_layer"), L)
                    ranking[tokens] = {"order": order, "scores": scores}
                    abl_plans += AB.ablation_plans(tokens, order, L, cfg.ablation_keep, cfg.ablation_mode,
                                                   cfg.sources_before_window)
            t0 = time.perf_counter()
            progress.start(f"closed loop: {len(plans) + len(abl_plans)} passes + baseline", len(idx))
            try:
                res = SU.closed_loop(bb, clt, plans + abl_plans, dataset, idx, labels, clf, scale, cfg.batch_size,
                                     progress)
            finally:
                progress.stop()
            timings["closedloop"] = time.perf_counter() - t0
            results["closedloop_baseline"] = res["baseline"]
            if plans:
                results["closedloop"] = {"baseline": res["baseline"], "rows": SU.window_rows(res, plans)}
            if abl_plans:
                results["ablation"] = {"rank": cfg.ablation_rank, "mode": cfg.ablation_mode,
                                       "keep": cfg.ablation_keep, "ranking": ranking,
                                       "baseline": res["baseline"], "rows": AB.ablation_rows(res, abl_plans, ranking)}
    retrieval_ds = _retrieval_dataset(cfg, store) if "retrieval" in results else None
    identity = {
        "store": {"url": cfg.store, "fingerprint": store.meta.get("fingerprint"), "model": store.model,
                  "dataset": {k: v for k, v in store.meta["dataset"].items() if k != "class_names"},
                  "tokens": store.meta.get("tokens"), "layout": store.layout.to_dict()},
        "clt": {"path": cfg.clt, "spec": clt.spec.to_dict(), "trained_on": run_meta.get("store")},
    }
    results["timings_s"] = {**timings, "total": time.perf_counter() - t_start}
    files = R.write_report(cfg.out, results, settings=to_dict(cfg), identity=identity,
                           class_names=store.class_names, labels=store.labels, dataset=retrieval_ds)
    return R.summary(results, files)
