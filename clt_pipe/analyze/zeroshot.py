"""Zero-shot classification from the store: the baseline, and open-loop (cache-only) CLT substitution.

Baseline: ``logits = logit_scale · normalise(embedding) @ text_classifier(template_set).T`` over the images
that were harvested (image_ok) and carry a label (≥ 0); top-1 / top-5 in percent (top-5 is top-min(5, C)).

Open-loop substitution (no images, no model): for the CLS token only, the final residual is
``resid_final = x0 + Σ attn_l + Σ y_l``, so replacing y_l by ŷ_l inside a window W edits it additively:

    resid_final' = resid_final + Σ_{l∈W} (ŷ_l − y_l)
    embedding'   = LayerNorm(resid_final'; ln_post weight/bias, eps) @ proj,   then normalise and classify.

ŷ_l comes from codes of the *true* (cached) inputs, so errors do not cascade (that is what closed-loop does).
Beside every window the same edit with ŷ_l = μ_l (the per-position train mean of the CLS MLP output,
mean-ablation) and ŷ_l = 0 (zero-ablation) is classified: what the CLT's substitution is worth against knowing
nothing about the image; every row carries its paired comparison with the baseline (``analyze.paired``).
Which sources write into a substituted layer is the source rule of ``clt_pipe.analyze.sources`` (by default
all 0..j: the CLT's full reconstruction; in-window only with ``sources_before_window = false``). This
assumes ``ls_2`` is the identity (true for every CLIP ViT in open_clip). Both the stored-embedding baseline and
the baseline recomputed from ``resid_final`` with the stored head are reported; open-loop deltas are against
the latter (same arithmetic, so an exact CLT reproduces it bit for bit).

Windows are "first-last" layer ranges. The defaults are written for 12-layer ViTs: when a window ends past
the store's last layer, every window is rescaled by (L−1)/max_end (start rounded down, end to nearest; e.g.
6 layers: 0-11→0-5, 3-11→1-5, 7-11→3-5, 10-11→4-5); duplicates are dropped and the mapping is recorded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from clt_pipe.analyze.paired import paired_columns
from clt_pipe.analyze.stream import ChunkBatch, iter_chunks
from clt_pipe.analyze.sources import source_floor, sources_for
from clt_pipe.errors import CltPipeError

DEFAULT_LN_EPS = 1e-5
# what a substituted window's MLP outputs become, as the report's ``replaced_by`` column says it
REPLACED_BY = {"clt": "CLT", "mean": "train mean (mean-ablation)", "zero": "zero (zero-ablation)"}


# ---------------------------------------------------------------------------------------------- helpers

def topk_hits(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, k: int = 5) -> np.ndarray:
    """[n, 2] bool: (top-1 correct, top-min(k, C) correct)."""
    lg = torch.as_tensor(logits)
    lab = torch.as_tensor(labels, device=lg.device).long()
    kk = min(k, lg.shape[1])
    top = lg.topk(kk, dim=1).indices
    hit1 = top[:, 0] == lab
    hitk = (top == lab[:, None]).any(1)
    return torch.stack([hit1, hitk], 1).cpu().numpy()


def accuracy(hits: np.ndarray) -> dict:
    n = int(hits.shape[0])
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "n": 0}
    return {"top1": 100.0 * float(hits[:, 0].mean()), "top5": 100.0 * float(hits[:, 1].mean()), "n": n}


def classify(emb: torch.Tensor, classifier: torch.Tensor, logit_scale: float) -> torch.Tensor:
    emb = emb.float()
    return logit_scale * (emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ classifier.float().T


def head_embed(resid: torch.Tensor, head: dict, eps: float) -> torch.Tensor:
    """ln_post then proj, from float tensors in ``head`` (ln_post_weight, ln_post_bias, proj)."""
    d = resid.shape[-1]
    return F.layer_norm(resid.float(), (d,), head["ln_post_weight"], head["ln_post_bias"], eps) @ head["proj"]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float(), labels.long().to(logits.device)))


def eval_images(store) -> np.ndarray:
    """Store image indices used for zero-shot: harvested (image_ok) and labelled."""
    return np.flatnonzero(store.image_ok & (store.labels >= 0))


def logit_scale(store) -> float:
    return float(store.model.get("logit_scale", 100.0))


def ln_eps(store) -> float:
    return float(store.model.get("ln_eps", DEFAULT_LN_EPS))


def parse_windows(windows: list[str], n_layers: int) -> list[dict]:
    """``["0-11", ...]`` -> [{"name", "requested", "first", "last", "rescaled"}], fitted to ``n_layers``."""
    parsed = []
    for w in windows:
        a, b = (int(v) for v in w.split("-"))
        if a > b:
            raise CltPipeError(f"windows: {w!r} starts after it ends")
        parsed.append((w, a, b))
    max_end = max(b for _, _, b in parsed)
    scale = (n_layers - 1) / max_end if max_end > n_layers - 1 and max_end > 0 else 1.0
    out, seen = [], set()
    for w, a, b in parsed:
        fa, fb = (int(math.floor(a * scale + 1e-9)), int(round(b * scale))) if scale != 1.0 else (a, b)
        fa, fb = min(fa, n_layers - 1), min(fb, n_layers - 1)
        if (fa, fb) in seen:
            continue
        seen.add((fa, fb))
        out.append({"name": f"{fa}-{fb}", "requested": w, "first": fa, "last": fb, "rescaled": scale != 1.0})
    return out


# ---------------------------------------------------------------------------------------------- baseline

def baseline(store, template_set: str, device: torch.device | str = "cpu") -> dict:
    """Zero-shot accuracy of the stored (unmodified) image embeddings."""
    idx = eval_images(store)
    if len(idx) == 0:
        raise CltPipeError("zeroshot: the store has no labelled, harvested images")
    clf = torch.from_numpy(store.text_classifier(template_set)).to(device)
    emb = torch.from_numpy(store.per_image("embedding")[idx]).to(device)
    labels = torch.from_numpy(store.labels[idx].astype(np.int64)).to(device)
    logits = classify(emb, clf, logit_scale(store))
    res = accuracy(topk_hits(logits, labels))
    res.update(cross_entropy=cross_entropy(logits, labels), template_set=template_set,
               logit_scale=logit_scale(store), n_classes=int(clf.shape[0]))
    res["predictions"] = logits.argmax(1).cpu().numpy()
    res["images"] = idx
    return res


# ---------------------------------------------------------------------------------------------- open loop

class OpenLoopAccumulator:
    """Consumes ChunkBatch objects; classifies each image's edited CLS residual for every window."""

    def __init__(self, store, clt, windows: list[dict], template_set: str, sources_before_window: bool,
                 device: torch.device, means: torch.Tensor | None = None):
        self.clt = clt
        # replacements per window: the CLT, then (with the means) the train mean and zero
        self.cls_mean = None if means is None else means[:, 0].to(device).float()  # [L, d]
        self.replacements = ("clt",) if means is None else ("clt", "mean", "zero")
        self.windows = windows
        self.sbw = sources_before_window
        self.device = device
        head = store.head()
        self.head = {k: torch.from_numpy(v).float().to(device) for k, v in head.items()}
        self.eps = ln_eps(store)
        self.scale = logit_scale(store)
        self.clf = torch.from_numpy(store.text_classifier(template_set)).float().to(device)
        self.resid = store.per_image("resid_final")
        self.labels = store.labels
        self.use = np.zeros(store.layout.n_images, bool)
        self.use[eval_images(store)] = True
        self.hits = {(w["name"], r): [] for w in windows for r in self.replacements}
        self.hits_base: list[np.ndarray] = []
        self.ce = {(w["name"], r): 0.0 for w in windows for r in self.replacements}
        self.ce_base = 0.0
        self.n_cls = 0

    @torch.no_grad()
    def update(self, batch: ChunkBatch) -> None:
        m = batch.mask("cls") & self.use[batch.image]
        if not m.any():
            return
        mt = torch.from_numpy(m).to(batch.x.device)
        x, y = batch.x[mt], batch.y[mt]
        imgs = batch.image[m]
        self.n_cls += len(imgs)
        resid = torch.from_numpy(self.resid[imgs]).float().to(self.device)
        labels = torch.from_numpy(self.labels[imgs].astype(np.int64)).to(self.device)
        z = self.clt.encode(x)  # [n, L, F] from the true (cached) inputs
        zs = [z[:, i] for i in range(z.shape[1])]
        base_logits = classify(head_embed(resid, self.head, self.eps), self.clf, self.scale)
        self.hits_base.append(topk_hits(base_logits, labels))
        self.ce_base += cross_entropy(base_logits, labels) * len(imgs)
        for w in self.windows:
            floor = source_floor(w["first"], self.sbw)
            layers = range(w["first"], w["last"] + 1)
            for r in self.replacements:
                delta = torch.zeros_like(resid)
                for j in layers:
                    if r == "clt":
                        srcs = [zs[i] if on else None for i, on in enumerate(sources_for(j, floor))]
                        delta += self.clt.decode_to(srcs, j).float()
                    elif r == "mean":
                        delta += self.cls_mean[j]
                    delta -= y[:, j].float()
                logits = classify(head_embed(resid + delta, self.head, self.eps), self.clf, self.scale)
                self.hits[(w["name"], r)].append(topk_hits(logits, labels))
                self.ce[(w["name"], r)] += cross_entropy(logits, labels) * len(imgs)

    def result(self) -> dict:
        if self.n_cls == 0:
            raise CltPipeError("openloop: the store holds no CLS slots of labelled images (tokens=patches?); "
                               "open-loop substitution edits the CLS residual and needs them")
        base_hits = np.concatenate(self.hits_base)
        base = accuracy(base_hits)
        base["cross_entropy"] = self.ce_base / self.n_cls
        rows = []
        for w in self.windows:
            for r in self.replacements:
                hits = np.concatenate(self.hits[(w["name"], r)])
                acc = accuracy(hits)
                rows.append({"mode": "openloop", "replaced_by": REPLACED_BY[r], "tokens": "cls", "window": w["name"],
                             "requested": w["requested"], "first": w["first"], "last": w["last"], **acc,
                             "cross_entropy": self.ce[(w["name"], r)] / self.n_cls,
                             "delta_top1_pp": acc["top1"] - base["top1"], "delta_top5_pp": acc["top5"] - base["top5"],
                             **paired_columns(base_hits, hits, with_top5=self.clf.shape[0] > 5)})
        return {"baseline_resid": base, "rows": rows}


def openloop_substitution(store, clt, windows: list[str], template_set: str = "single",
                          sources_before_window: bool = True, device: torch.device | str = "cpu",
                          read_threads: int = 4, means: torch.Tensor | None = None) -> dict:
    """Stand-alone open-loop pass. Only chunks holding CLS slots are needed, but a chunk is read whole."""
    device = torch.device(device)
    acc = OpenLoopAccumulator(store, clt, parse_windows(windows, store.n_layers), template_set,
                              sources_before_window, device, means)
    for batch in iter_chunks(store, device, 0, read_threads):
        acc.update(batch)
    return acc.result()
