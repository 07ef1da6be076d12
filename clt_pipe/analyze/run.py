"""`clt-pipe analyze`: validate inputs, run the selected parts, write the report.

Every part declares what it needs (``PARTS``): the parts whose results it reads, and whether it consumes the
streamed pass over the store's chunks (fidelity, attribution, openloop, retrieval share one pass) or re-runs
the ViT on the store's images (closedloop, ablation) or on a few chosen ones (graphs). A part needed by a
selected one is computed too, and recorded in ``report.json`` (``computed``, ``notes``). Results are
collected in ``AnalyzeResults``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from clt_pipe import signals
from clt_pipe.analyze import ablation as AB
from clt_pipe.analyze import attribution as AT
from clt_pipe.analyze import report as R
from clt_pipe.analyze import retrieval as RT
from clt_pipe.analyze import sources as SRC
from clt_pipe.analyze import substitution as SU
from clt_pipe.analyze import zeroshot as ZS
from clt_pipe.analyze.atlas import run as ATL
from clt_pipe.analyze.atlas.scan import FeatureScan
from clt_pipe.analyze.compare import write_comparison
from clt_pipe.analyze.fidelity import FidelityAccumulator
from clt_pipe.analyze.graph.part import GraphsPart
from clt_pipe.analyze.inputs import check_clt_matches_store, distinct_prefix
from clt_pipe.analyze.means import PositionMeans, train_means
from clt_pipe.analyze.stream import iter_chunks
from clt_pipe.backbone.loading import load_backbone
from clt_pipe.clt.rundir import diverged, load_fitted, read_run
from clt_pipe.clt.sweepdir import is_sweep, member_dirs
from clt_pipe.config import AnalyzeConfig, to_dict
from clt_pipe.device import resolve_device
from clt_pipe.errors import CltPipeError
from clt_pipe.outdir import hold_out_dir
from clt_pipe.progress import NullProgress, RichProgress
from clt_pipe.store.reader import ActivationStore


def closed_loop_inputs(cfg: AnalyzeConfig, store: ActivationStore, device: torch.device):
    """(dataset, backbone, image indices, labels) for the closed-loop parts, or a clear CltPipeError."""
    from clt_pipe.datasets.registry import open_dataset

    ds_meta = store.meta.dataset
    name = ds_meta.name
    split = cfg.split or ds_meta.split
    if name != "digits" and not cfg.data_root:
        raise CltPipeError(f"closedloop/ablation re-run the ViT on the store's {name} images: pass --data-root "
                           f"(the store was harvested from {ds_meta.data_root or '?'}), or leave them out "
                           f"with --only")
    m = store.meta.model
    bb = load_backbone(m.model_arg, m.pretrained, device)
    if bb.identity.weights_sha256 != m.weights_sha256:
        now, then = bb.identity.weights_sha256, m.weights_sha256
        raise CltPipeError(f"closedloop/ablation: weights {m.pretrained!r} now hash to {distinct_prefix(now, then)}, "
                           f"the store was harvested with {distinct_prefix(then, now)}")
    dataset = open_dataset(name, cfg.data_root, split,
                           coco_label_rule=ds_meta.coco_label_rule or "largest_area")
    if split == ds_meta.split:
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

    ds = store.meta.dataset
    root = cfg.data_root or ds.data_root
    try:
        dataset = open_dataset(ds.name, root, ds.split)
        if len(dataset) < store.layout.n_images:
            return None
        return dataset
    except CltPipeError:
        return None


@dataclass(frozen=True)
class Part:
    name: str
    kind: str  # "store": per-image store arrays only | "stream": the chunk pass | "closedloop": re-runs the ViT
    #            on the evaluated images | "images": re-runs it on a few chosen images
    needs: tuple[str, ...] = ()  # parts whose results this one reads
    cls_only: bool = False  # reads CLS slots


PARTS: dict[str, Part] = {p.name: p for p in (
    Part("zeroshot", "store"),
    Part("fidelity", "stream"),
    Part("attribution", "stream"),
    Part("openloop", "stream", cls_only=True),
    Part("retrieval", "stream", cls_only=True),
    Part("atlas", "stream"),
    Part("closedloop", "closedloop"),
    Part("ablation", "closedloop"),  # needs: by ablation_rank, see part_needs
    Part("graphs", "images"),  # a few images through the ViT: built before the atlas's pass, pages after it
)}


# parts that compare against the per-position train means (mean-ablation, the mean predictor)
MEAN_PARTS = {"fidelity", "openloop", "closedloop", "ablation"}


def part_needs(name: str, cfg: AnalyzeConfig) -> tuple[str, ...]:
    if name == "ablation":
        return ("fidelity",) if cfg.ablation_rank == "fvu" else ("attribution",)
    return PARTS[name].needs


@dataclass
class AnalyzeResults:
    """Everything ``analyze`` measured; ``to_dict`` is the ``results`` object of report.json."""

    parts: list[str]
    computed: list[str]
    notes: list[str]
    windows: list[dict]
    substitution_rule: dict  # {"name": full | window, "text": ...}
    zeroshot: dict | None = None
    fidelity: dict | None = None
    attribution: dict | None = None
    openloop: dict | None = None
    retrieval: dict | None = None
    closedloop_baseline: dict | None = None
    closedloop: dict | None = None
    ablation: dict | None = None
    mean_baseline: dict | None = None  # where the per-position means (mean-ablation, mean predictor) come from
    atlas: dict | None = None
    graphs: dict | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Context:
    """What the parts read: the validated inputs of one analyze run."""

    cfg: AnalyzeConfig
    store: ActivationStore
    clt: object
    device: torch.device
    windows: list[dict]
    closed_loop: tuple | None = None  # closed_loop_inputs(...) when a closed-loop part runs
    means: PositionMeans | None = None
    graphs: GraphsPart | None = None

    @property
    def mu(self) -> torch.Tensor | None:
        return None if self.means is None else self.means.y

    @property
    def n_layers(self) -> int:
        return self.store.n_layers


def plan_parts(cfg: AnalyzeConfig) -> tuple[list[str], set[str], list[str]]:
    """(selected parts, parts to compute, notes about parts added for others)."""
    parts = list(dict.fromkeys(cfg.only))
    need = set(parts)
    notes: list[str] = []
    for name in parts:
        for dep in part_needs(name, cfg):
            if dep not in need:
                need.add(dep)
                notes.append(f"{name} ranks by {cfg.ablation_rank}: computed the {dep} part for it"
                             if name == "ablation" else f"{name} needs {dep}: computed it")
    return parts, need, notes


def _check_tokens(store: ActivationStore, need: set[str], cfg: AnalyzeConfig) -> None:
    if bool((store.token_index == 0).any()):
        return
    cls_parts = [n for n in sorted(need) if PARTS[n].cls_only]
    if cls_parts:
        raise CltPipeError(f"{'/'.join(cls_parts)} use the CLS token but the store "
                           f"({store.meta.tokens.policy} tokens) has no CLS slots; leave them out with --only")
    if "ablation" in need and cfg.ablation_rank in ("attribution", "final_layer"):
        raise CltPipeError("ablation: CLS attribution needs CLS slots and the store has none")


def _stream_accumulators(ctx: Context, need: set[str]) -> dict:
    cfg, store, clt = ctx.cfg, ctx.store, ctx.clt
    makers = {
        "fidelity": lambda: FidelityAccumulator(clt, store.stats()["var_out"], means=ctx.mu),
        "attribution": lambda: AT.AttributionAccumulator(clt),
        "openloop": lambda: ZS.OpenLoopAccumulator(store, clt, ctx.windows, cfg.template_set,
                                                   cfg.sources_before_window, ctx.device, ctx.mu),
        "retrieval": lambda: RT.RetrievalAccumulator(store, clt, ctx.device, cfg.retrieval_queries,
                                                     cfg.retrieval_k, cfg.retrieval_eval_queries,
                                                     read_threads=cfg.read_threads),
        "atlas": lambda: FeatureScan(clt, cfg.atlas_top_images),
    }
    return {name: make() for name, make in makers.items() if name in need}


def run_stream_parts(ctx: Context, need: set[str], res: AnalyzeResults, progress) -> None:
    """One pass over the store's chunks feeding every selected cache-only part."""
    accs = _stream_accumulators(ctx, need)
    if not accs:
        return
    cfg, lay = ctx.cfg, ctx.store.layout
    t0 = time.perf_counter()
    n_chunks = lay.n_chunks if not cfg.max_tokens else min(lay.n_chunks, -(-cfg.max_tokens // lay.rows_per_chunk))
    progress.start("analyze: " + " + ".join(accs), n_chunks)
    try:
        for batch in iter_chunks(ctx.store, ctx.device, cfg.max_tokens, cfg.read_threads):
            for a in accs.values():
                a.update(batch)
            progress.advance(1, rows=batch.x.shape[0])
    finally:
        progress.stop()
    res.timings_s["stream"] = time.perf_counter() - t0
    for name, a in accs.items():
        setattr(res, name, a.result())
    if res.atlas is not None:
        listed = list(dict.fromkeys(cfg.atlas_features + (ctx.graphs.features if ctx.graphs else [])))
        res.atlas = ATL.finish_atlas(ctx.store, ctx.clt, res.atlas, cfg.out, listed=listed,
                                     top_per_layer=cfg.atlas_top_per_layer, template_set=cfg.template_set,
                                     device=ctx.device, data_root=cfg.data_root, read_threads=cfg.read_threads,
                                     store_url=cfg.store, clt_path=cfg.clt)
        res.atlas["scan_s"] = accs["atlas"].seconds
        res.timings_s["atlas"] = accs["atlas"].seconds + res.atlas["render_s"]
    if res.fidelity is not None and not res.fidelity["per_layer"]:
        raise CltPipeError("fidelity: no valid token rows were evaluated (empty token selection)")


def window_plans(ctx: Context) -> tuple[list[SU.Plan], list[dict]]:
    """Closed-loop plans of every window × token type (the CLT, then mean- and zero-ablation of the same layers),
    and the rows of windows that cannot reach the readout (not run)."""
    plans, unreachable = [], []
    kinds = ("clt",) if ctx.means is None else ("clt", "mean", "zero")
    for tokens in ctx.cfg.window_tokens:
        for w in ctx.windows:
            meta = {"window": w["name"], "requested": w["requested"], "first": w["first"], "last": w["last"]}
            if not SU.reaches_readout(tokens, w["first"], ctx.n_layers):
                unreachable.append({"mode": "closedloop", "tokens": tokens, **meta, "reaches_readout": False,
                                    "note": SU.UNREACHABLE_NOTE})
                continue
            for kind in kinds:
                if kind == "clt":
                    p = SU.window_plan(tokens, w["first"], w["last"], ctx.cfg.sources_before_window)
                else:
                    p = SU.Plan(f"{tokens}:{w['first']}-{w['last']}:{kind}", tokens,
                                {j: kind for j in range(w["first"], w["last"] + 1)})
                p.meta = {"replaced_by": ZS.REPLACED_BY[kind], **meta}
                plans.append(p)
    return plans, unreachable


def ablation_setup(ctx: Context, res: AnalyzeResults) -> tuple[list[SU.Plan], dict]:
    plans: list[SU.Plan] = []
    ranking: dict = {}
    cfg = ctx.cfg
    for tokens in AB.ABLATION_TOKENS:
        order, scores = AB.rank_layers(cfg.ablation_rank, tokens, res.attribution,
                                       (res.fidelity or {}).get("per_layer"), ctx.n_layers)
        ranking[tokens] = {"order": order, "scores": scores}
        plans += AB.ablation_plans(tokens, order, ctx.n_layers, cfg.ablation_keep, cfg.ablation_mode,
                                   cfg.ablation_protocol)
    return plans, ranking


def run_closed_loop_parts(ctx: Context, need: set[str], res: AnalyzeResults, progress) -> None:
    if ctx.closed_loop is None:
        return
    cfg = ctx.cfg
    dataset, bb, idx, labels = ctx.closed_loop
    plans, unreachable = window_plans(ctx) if "closedloop" in need else ([], [])
    abl_plans, ranking = ablation_setup(ctx, res) if "ablation" in need else ([], {})
    t0 = time.perf_counter()
    progress.start(f"closed loop: {len(plans) + len(abl_plans)} passes + baseline", len(idx))
    try:
        out = SU.closed_loop(bb, ctx.clt, plans + abl_plans, dataset, idx, labels,
                             ctx.store.text_classifier(cfg.template_set), ZS.logit_scale(ctx.store),
                             cfg.batch_size, progress, means=ctx.mu)
    finally:
        progress.stop()
    res.timings_s["closedloop"] = time.perf_counter() - t0
    res.closedloop_baseline = out["baseline"]
    if plans or unreachable:
        res.closedloop = {"baseline": out["baseline"], "rows": SU.window_rows(out, plans) + unreachable}
    if abl_plans:
        res.ablation = {"rank": cfg.ablation_rank, "rank_rule": AB.RANK_DESCRIPTIONS[cfg.ablation_rank],
                        "mode": cfg.ablation_mode,
                        "mode_rule": AB.mode_description(cfg.ablation_protocol, cfg.ablation_mode),
                        "protocol": cfg.ablation_protocol,
                        "protocol_rule": AB.PROTOCOL_DESCRIPTIONS[cfg.ablation_protocol],
                        "keep": cfg.ablation_keep, "ranking": ranking, "baseline": out["baseline"],
                        "rows": AB.ablation_rows(out, abl_plans, ranking, ctx.n_layers)}


def run_analyze(cfg: AnalyzeConfig, console=None) -> dict:
    with hold_out_dir(cfg.out, "analyze"):
        if is_sweep(cfg.clt):  # every member (each holding its own folder), then the comparison across them
            return _analyze_sweep(cfg, console)
        return _analyze(cfg, console)


def _analyze(cfg: AnalyzeConfig, console) -> dict:
    t_start = time.perf_counter()
    progress = RichProgress(console) if console is not None else NullProgress()
    store = ActivationStore(cfg.store)
    clt, run_meta = load_fitted(cfg.clt)
    check_clt_matches_store(store, clt, run_meta)
    device = resolve_device(cfg.device)
    clt = clt.to(device).eval()
    parts, need, notes = plan_parts(cfg)
    windows = ZS.parse_windows(cfg.windows, store.n_layers)
    if any(w["rescaled"] for w in windows):
        notes.append(f"windows rescaled to the store's {store.n_layers} layers: " +
                     ", ".join(f"{w['requested']}→{w['name']}" for w in windows))
    _check_tokens(store, need, cfg)
    if "atlas" in need and not ATL.has_patches(store):
        need.discard("atlas")
        notes.append(f"atlas skipped: the store ({store.meta.tokens.policy} tokens) has no patch tokens")
    if "atlas" in need:
        ATL.parse_features(cfg.atlas_features, clt.spec.n_layers, clt.spec.n_features)  # fail before the pass
    ctx = Context(cfg, store, clt, device, windows)
    if any(PARTS[n].kind == "closedloop" for n in need):
        ctx.closed_loop = closed_loop_inputs(cfg, store, device)  # fail before the long streaming pass
    if "graphs" in need:  # its images are read now: a data root without them fails before the long pass
        ctx.graphs = GraphsPart(cfg, store, clt, device, backbone=ctx.closed_loop[1] if ctx.closed_loop else None,
                                run_meta=run_meta)
    if need & MEAN_PARTS:
        t0 = time.perf_counter()
        with torch.inference_mode():
            ctx.means = train_means(store, (run_meta.get("store") or {}).get("url"), device, cfg.mean_images,
                                    cfg.read_threads)
        timings_means = time.perf_counter() - t0

    res = AnalyzeResults(parts=parts, computed=sorted(need), notes=notes, windows=windows,
                         substitution_rule={"name": SRC.rule(cfg.sources_before_window),
                                            "text": SRC.describe(cfg.sources_before_window)})
    if ctx.means is not None:
        res.mean_baseline = {"source": ctx.means.source, "n_images": ctx.means.n_images,
                             "in_sample": ctx.means.in_sample, "text": ctx.means.describe()}
        res.timings_s["means"] = timings_means
    if ctx.graphs is not None:  # first: the atlas gives every kept feature node a page
        ctx.graphs.build()
    with torch.inference_mode():
        if "zeroshot" in need:
            t0 = time.perf_counter()
            base = ZS.baseline(store, cfg.template_set, device)
            res.zeroshot = {k: v for k, v in base.items() if k not in ("predictions", "images")}
            res.timings_s["zeroshot"] = time.perf_counter() - t0
        run_stream_parts(ctx, need, res, progress)
        run_closed_loop_parts(ctx, need, res, progress)
    if ctx.graphs is not None:
        res.graphs = ctx.graphs.finish(Path(cfg.out) / ATL.ATLAS_DIR if res.atlas is not None else None)
        res.timings_s["graphs"] = res.graphs["seconds"]
    retrieval_ds = _retrieval_dataset(cfg, store) if res.retrieval is not None else None
    if res.retrieval is not None:
        res.retrieval["grids"] = "images" if retrieval_ds is not None else "indices"
    identity = {
        "store": {"url": cfg.store, "fingerprint": store.meta.fingerprint, "model": store.model,
                  "dataset": store.meta.dataset.without_class_names(), "tokens": store.meta.tokens.to_dict(),
                  "layout": store.layout.to_dict()},
        "clt": {"path": cfg.clt, "spec": clt.spec.to_dict(), "trained_on": run_meta.get("store")},
    }
    res.timings_s["total"] = time.perf_counter() - t_start
    results = res.to_dict()
    with signals.stop_point():  # a report is written whole or not at all: a stop now waits for it
        files = R.write_report(cfg.out, results, settings=to_dict(cfg), identity=identity,
                               class_names=store.class_names, labels=store.labels, dataset=retrieval_ds)
    if signals.requested():
        raise signals.Stopped(signals.requested(), f"analyze stopped by {signals.signal_name(signals.requested())} "
                                                   f"while writing its report; the report in {cfg.out} is complete")
    return R.summary(results, files)


def _analyze_sweep(cfg: AnalyzeConfig, console=None) -> dict:
    """`analyze` whose --clt is a fit sweep: each finished member's own report into OUT/<member>/, then the
    comparison across them into OUT (analyze/compare.py); members that diverged or did not finish are named."""
    say = console.print if console else (lambda *a: None)
    done, notes = [], []
    for name, run_dir in member_dirs(cfg.clt):
        why = diverged(run_dir)
        if why is None and not (run_dir / "run.json").is_file():
            why = "not fitted yet"
        elif why is None and not read_run(run_dir).get("finished"):
            why = "its fit did not finish"
        if why is not None:
            notes.append(f"{name} left out: {why}")
            say(f"[yellow]{name}[/] left out: {why}")
            continue
        member_out = Path(cfg.out) / name
        say(f"[bold]analyze {name}[/] -> {member_out}")
        run_analyze(replace(cfg, clt=str(run_dir), out=str(member_out)), console=console)
        done.append((name, member_out))
    if not done:
        raise CltPipeError(f"{cfg.clt}: no member of the sweep has finished fitting ({'; '.join(notes)})")
    return write_comparison(cfg.out, done, settings=to_dict(cfg), notes=notes)
