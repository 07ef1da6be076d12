"""What a feature writes: its decoder footprint and its direct effect on the zero-shot logits.

Footprint of feature (s, f): for each target layer t ≥ s, ‖W_dec[s][f, t−s] · out_scale[t]‖ — the norm of the
raw-space vector one unit of activation adds to layer t's MLP output (0 for t < s: a CLT writes forward only).

Logit effect: one unit of activation adds v = Σ_t W_dec[s][f, t−s] · out_scale[t] to the residual stream
(every MLP output is added to it; stores of models with LayerScale are treated as identity scales). Its
direct path to the image embedding goes through ``ln_post`` — linearised at the mean CLS residual x̄ over the
store's ``resid_final`` — and ``proj``:

    J v = w ⊙ (v_c − (x̂·v_c / d) x̂) / σ(x̄),   v_c = v − mean(v),  x̂ = (x̄ − mean(x̄)) / σ(x̄)
    e   = (J v) @ proj

and through the embedding's L2 normalisation, linearised at ē = ln_post(x̄) @ proj:
δlogit_c = logit_scale · text_classifier[c] · (e − (ê·e) ê) / ‖ē‖. Classes are ranked by δlogit_c: the top
ones are pushed towards, the bottom ones away from. It is the first-order direct effect only (no later
attention or MLP reading the write).
"""

from __future__ import annotations

import numpy as np

from clt_pipe.store import format as SF


def _raw_rows(clt, layer: int, feature: int) -> np.ndarray:
    """[L, d] raw-space decoder rows of one feature into every target layer (zeros before its own layer)."""
    L, d = clt.spec.n_layers, clt.spec.d_model
    w = clt.W_dec[layer][feature].detach().double().cpu()  # [L - layer, d]
    scale = clt.out_scale.detach().double().cpu()[layer:]
    out = np.zeros((L, d))
    out[layer:] = (w * scale[:, None]).numpy()
    return out


def footprint(clt, layer: int, feature: int) -> np.ndarray:
    """[L] norm of the feature's raw-space write into each target layer."""
    return np.linalg.norm(_raw_rows(clt, layer, feature), axis=-1)


def mean_resid(store, images_per_read: int = 4096) -> np.ndarray | None:
    """Mean CLS residual over harvested images, read in slices (bounded memory) unless another part of the run
    already holds them whole; None if no image is ok."""
    arr = store.per_image_if_read(SF.RESID_FINAL)
    arr = store.array(SF.RESID_FINAL) if arr is None else arr
    ok_arr = store.per_image_if_read(SF.IMAGE_OK)
    ok_arr = store.array(SF.IMAGE_OK) if ok_arr is None else ok_arr
    n = store.layout.n_images
    total, count = np.zeros(arr.shape[1]), 0
    for s in range(0, n, images_per_read):
        e = min(n, s + images_per_read)
        x = arr[s:e].astype(np.float64)
        ok = ok_arr[s:e].astype(bool) & np.isfinite(x).all(1)
        total += x[ok].sum(0)
        count += int(ok.sum())
    return total / count if count else None


class LogitLens:
    """Linearised direct path residual → zero-shot logits (see the module docstring)."""

    def __init__(self, store, template_set: str):
        from clt_pipe.analyze.zeroshot import ln_eps, logit_scale

        head = {k: v.astype(np.float64) for k, v in store.head().items()}
        self.w, self.b, self.proj = head["ln_post_weight"], head["ln_post_bias"], head["proj"]
        self.clf = store.text_classifier(template_set).astype(np.float64)  # [C, E]
        self.scale = logit_scale(store)
        self.class_names = store.class_names
        xbar = mean_resid(store)
        if xbar is None:
            xbar = np.zeros_like(self.w)
        eps = ln_eps(store)
        xc = xbar - xbar.mean()
        self.sigma = float(np.sqrt((xc ** 2).mean() + eps))
        self.xhat = xc / self.sigma
        ebar = (self.xhat * self.w + self.b) @ self.proj
        nrm = float(np.linalg.norm(ebar))
        # A degenerate point (e.g. all-zero synthetic residuals) has no direction to normalise along.
        self.ehat = ebar / nrm if nrm > 1e-8 else None
        self.enorm = nrm if nrm > 1e-8 else 1.0

    def class_effects(self, v: np.ndarray) -> np.ndarray:
        """[C] logit change per unit of a residual write ``v`` [d]."""
        d = v.shape[-1]
        vc = v - v.mean()
        jv = self.w * (vc - (self.xhat @ vc / d) * self.xhat) / self.sigma
        e = jv @ self.proj
        if self.ehat is not None:
            e = e - (self.ehat @ e) * self.ehat
        return self.scale * (self.clf @ e) / self.enorm

    def feature_effects(self, clt, layer: int, feature: int, top: int = 5) -> dict:
        eff = self.class_effects(_raw_rows(clt, layer, feature).sum(0))
        order = np.argsort(-eff, kind="stable")
        name = lambda c: self.class_names[c] if c < len(self.class_names) else str(c)  # noqa: E731
        return {"towards": [{"class": name(int(c)), "index": int(c), "dlogit": float(eff[c])} for c in order[:top]],
                "away": [{"class": name(int(c)), "index": int(c), "dlogit": float(eff[c])}
                         for c in order[::-1][:top]]}

