"""Closed-loop substitution: the ViT re-run on images with the CLT replacing MLP outputs (errors cascade).

A ``Plan`` says, per layer, what the MLP output at the selected token positions becomes:

* ``"clt"``  — the CLT reconstruction ``decode_to([z_0 … z_j], j)``, where every z_i = ``encode_layer`` of the
  *live* LN2 output of layer i (so upstream substitution errors propagate into later codes);
* ``"zero"`` — 0;
* ``"mean"`` — the per-position train mean of that MLP's output (``clt_pipe.analyze.means``): mean-ablation;
* ``"minus"`` — the model's own output minus what the CLT features of ``dropped_sources`` write into it (their
  live codes, no decoder bias): the real model without those layers' features;
* absent    — the model's own MLP output (untouched).

Which sources write is the source rule (``clt_pipe.analyze.sources``): sources i < ``source_floor`` and those in
``dropped_sources`` do not write (None in ``decode_to``); window plans use floor 0 by default (the CLT's full
reconstruction) and the window's first layer with ``sources_before_window = false``. Token types: ``cls`` =
position 0, ``patches`` = 1..N−1, ``all`` = every position. Forward hooks on ``ln_2`` (encode) and ``mlp``
(replace); nothing else of the model changes. The CLT object only needs ``encode_layer(x [N, d], layer)`` and
``decode_to(list, target)``, so a stub with the same interface can stand in (the tests use one that returns the
true MLP output).

The model runs in fp32 (autocast disabled) so substituted and baseline passes share arithmetic. Every plan's
top-1 is compared with the baseline's on the same images (``clt_pipe.analyze.paired``: lost / gained, exact
McNemar p, paired bootstrap interval).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from clt_pipe.analyze.paired import PAIRED_KEYS, paired_columns
from clt_pipe.analyze.sources import source_floor, sources_for
from clt_pipe.analyze.zeroshot import accuracy, classify, cross_entropy, topk_hits
from clt_pipe.precision import autocast_context
from clt_pipe.errors import CltPipeError
from clt_pipe.prefetch import prefetched
from clt_pipe.tokens import TokenType, token_positions


@dataclass
class Plan:
    name: str
    tokens: TokenType
    replace: dict[int, str] = field(default_factory=dict)  # layer -> "clt" | "zero" | "mean" | "minus"
    source_floor: int = 0
    meta: dict = field(default_factory=dict)  # carried into the result rows
    dropped_sources: frozenset[int] = frozenset()  # source layers whose features write into no target

    def writes(self, target: int) -> list[bool]:
        return sources_for(target, self.source_floor, self.dropped_sources)

    def layers(self, n_layers: int) -> dict[str, str]:
        """What each MLP outputs and which CLT sources write, as comma-separated layer lists (report columns)."""
        def cs(layers) -> str:
            return ",".join(map(str, sorted(layers)))

        modes = {m: cs(j for j, v in self.replace.items() if v == m) for m in ("clt", "zero", "mean", "minus")}
        writing = {i for j, v in self.replace.items() if v == "clt" for i, w in enumerate(self.writes(j)) if w}
        return {"mlp_clt": modes["clt"], "mlp_real": cs(j for j in range(n_layers) if j not in self.replace),
                "mlp_mean": modes["mean"], "mlp_zero": modes["zero"], "mlp_minus_features": modes["minus"],
                "clt_sources": cs(writing)}


UNREACHABLE_NOTE = ("not run: patch MLPs of the last layer never reach the CLS readout (equal to the baseline "
                    "by construction)")


def reaches_readout(tokens: TokenType, first: int, n_layers: int) -> bool:
    """Can substituting ``tokens`` at layers first..L−1 change the CLS-pooled embedding? Patch tokens reach the
    CLS token only through attention in a later block, so a patch window starting at the last layer cannot."""
    return tokens != "patches" or first < n_layers - 1


def window_plan(tokens: TokenType, first: int, last: int, sources_before_window: bool, name: str = "") -> Plan:
    return Plan(name or f"{tokens}:{first}-{last}", tokens, {j: "clt" for j in range(first, last + 1)},
                source_floor(first, sources_before_window))


class SubstitutionHooks:
    """Context manager installing the plan's hooks on a backbone."""

    def __init__(self, bb, clt, plan: Plan, sparse_codes: bool = False, means: torch.Tensor | None = None):
        self.bb, self.clt, self.plan = bb, clt, plan
        self.means = means  # [L, P, d] per-position train means of the MLP outputs, for "mean"
        if means is None and "mean" in plan.replace.values():
            raise ValueError(f"plan {plan.name}: mean-ablation needs the per-position means")
        self.batch_first = getattr(bb.visual.transformer, "batch_first", True)
        self.handles = []
        self.z: dict[int, torch.Tensor] = {}
        self.pos: torch.Tensor | None = None
        self.sparse_codes = sparse_codes
        clt_layers = [j for j, m in plan.replace.items() if m == "clt"]
        self.encode_layers = ({i for i in range(plan.source_floor, max(clt_layers) + 1)
                               if i not in plan.dropped_sources} if clt_layers else set())
        if "minus" in plan.replace.values():
            self.encode_layers |= set(plan.dropped_sources)

    def _bm(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batch_first else t.transpose(0, 1)

    def _ln2(self, layer: int):
        def hook(_m, _inp, out):
            if layer not in self.encode_layers:
                return None
            xb = self._bm(out)
            pos = self._positions(xb)
            rows = xb[:, pos].reshape(-1, xb.shape[-1]).float()
            z = self.clt.encode_layer(rows, layer)
            self.z[layer] = z.to_sparse() if self.sparse_codes else z
            return None

        return hook

    def _mlp(self, layer: int):
        def hook(_m, _inp, out):
            mode = self.plan.replace.get(layer)
            if mode is None:
                return None
            ob = self._bm(out)
            pos = self._positions(ob)
            new = ob.clone()
            if mode == "zero":
                new[:, pos] = 0
            elif mode == "mean":
                new[:, pos] = self.means[layer, pos].to(new.dtype)
            elif mode == "minus":
                srcs = [self.z.get(i) if i in self.plan.dropped_sources else None for i in range(layer + 1)]
                if any(z is not None for z in srcs):
                    part = self.clt.decode_to(srcs, layer)
                    b_dec = getattr(self.clt, "b_dec", None)
                    part = part if b_dec is None else part - b_dec[layer]
                    new[:, pos] -= part.view(ob.shape[0], len(pos), ob.shape[-1]).to(new.dtype)
            elif mode == "clt":
                srcs = [self.z.get(i) if w else None for i, w in enumerate(self.plan.writes(layer))]
                if any(z is not None for z in srcs):
                    rec = self.clt.decode_to(srcs, layer).view(ob.shape[0], len(pos), ob.shape[-1])
                else:  # every source dropped: only the decoder bias (if any) is left
                    b_dec = getattr(self.clt, "b_dec", None)
                    rec = torch.zeros_like(new[:, pos]) + (0 if b_dec is None else b_dec[layer].to(new.dtype))
                new[:, pos] = rec.to(new.dtype)
            else:
                raise ValueError(f"plan {self.plan.name}: unknown mode {mode!r} for layer {layer}")
            return new if self.batch_first else new.transpose(0, 1)

        return hook

    def _positions(self, xb: torch.Tensor) -> torch.Tensor:
        if self.pos is None or self.pos.device != xb.device:
            self.pos = torch.from_numpy(token_positions(self.plan.tokens, xb.shape[1])).to(xb.device)
        return self.pos

    def __enter__(self):
        for layer, block in enumerate(self.bb.blocks):
            self.handles.append(block.ln_2.register_forward_hook(self._ln2(layer)))
            self.handles.append(block.mlp.register_forward_hook(self._mlp(layer)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.z.clear()
        return False


@torch.inference_mode()
def encode_images(bb, images: torch.Tensor, plan: Plan | None, clt, means: torch.Tensor | None = None) -> torch.Tensor:
    """Image embeddings [B, e] (not normalised) with ``plan`` applied (None = the unmodified model)."""
    with autocast_context(images.device, "fp32"):
        if plan is None or not plan.replace:
            return bb.model.encode_image(images).float()
        with SubstitutionHooks(bb, clt, plan, means=means):
            return bb.model.encode_image(images).float()


def load_batches(dataset, preprocess, indices: np.ndarray, batch_size: int, workers: int = 2):
    """Preprocessed image batches (one batch decoded ahead in a thread pool)."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="clt-analyze-img")
    try:
        batches = [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]

        def load(idx):
            return idx, torch.stack([preprocess(dataset.load_image(int(i))) for i in idx])

        for _, fut in prefetched(batches, lambda idx: pool.submit(load, idx)):
            yield fut.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def closed_loop(bb, clt, plans: list[Plan], dataset, indices: np.ndarray, labels: np.ndarray,
                classifier: np.ndarray, logit_scale: float, batch_size: int = 64, progress=None,
                means: torch.Tensor | None = None) -> dict:
    """Run the baseline and every plan over the images; returns {"baseline": acc, "plans": {name: acc}}.

    ``labels`` are the store's labels of ``indices``. Each acc dict has top1/top5 (percent), n, cross_entropy
    (with CLIP's logit_scale) and ``agree_top1`` (fraction of images whose top-1 equals the baseline's), and the
    paired columns against the baseline (lost, gained, mcnemar_p, ci_lo_pp, ci_hi_pp; top5_* too when there
    are more than 5 classes). ``means``: per-position MLP output means for plans that mean-ablate.
    """
    dev = bb.device
    clf = torch.from_numpy(np.asarray(classifier)).float().to(dev)
    means = None if means is None else means.to(dev)
    hits: dict[str, list] = {"__base__": []}
    ce: dict[str, float] = {"__base__": 0.0}
    agree: dict[str, int] = {}
    for p in plans:
        hits[p.name], ce[p.name], agree[p.name] = [], 0.0, 0
    n = 0
    pos_in = {int(i): k for k, i in enumerate(indices)}
    for idx, x in load_batches(dataset, bb.preprocess, indices, batch_size):
        x = x.to(dev)
        lab = torch.from_numpy(np.array([labels[pos_in[int(i)]] for i in idx], np.int64)).to(dev)
        base = classify(encode_images(bb, x, None, clt), clf, logit_scale)
        base_pred = base.argmax(1)
        hits["__base__"].append(topk_hits(base, lab))
        ce["__base__"] += cross_entropy(base, lab) * len(idx)
        for p in plans:
            lg = classify(encode_images(bb, x, p, clt, means), clf, logit_scale)
            hits[p.name].append(topk_hits(lg, lab))
            ce[p.name] += cross_entropy(lg, lab) * len(idx)
            agree[p.name] += int((lg.argmax(1) == base_pred).sum())
        n += len(idx)
        if progress is not None:
            progress.advance(len(idx), images=len(idx))
    if n == 0:
        raise CltPipeError("closedloop: no images to evaluate")
    base_hits = np.concatenate(hits["__base__"])
    base_acc = accuracy(base_hits)
    base_acc["cross_entropy"] = ce["__base__"] / n
    out = {}
    for p in plans:
        plan_hits = np.concatenate(hits[p.name])
        acc = accuracy(plan_hits)
        acc.update(cross_entropy=ce[p.name] / n, agree_top1=agree[p.name] / n,
                   delta_top1_pp=acc["top1"] - base_acc["top1"], delta_top5_pp=acc["top5"] - base_acc["top5"],
                   **paired_columns(base_hits, plan_hits, with_top5=clf.shape[0] > 5))
        out[p.name] = acc
    return {"baseline": base_acc, "plans": out}


def window_rows(result: dict, plans: list[Plan]) -> list[dict]:
    rows = []
    for p in plans:
        r = result["plans"][p.name]
        rows.append({"mode": "closedloop", "tokens": p.tokens, **p.meta,
                     **{k: r[k] for k in ("top1", "top5", "n", "cross_entropy", "agree_top1")},
                     **{k: v for k, v in r.items() if k.startswith(("delta_", "top5_")) or k in PAIRED_KEYS}})
    return rows
