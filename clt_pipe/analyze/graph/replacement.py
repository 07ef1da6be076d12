"""The ViT at one image, and its replacement model: the same network made linear by freezing what is not.

``capture`` runs an open_clip CLS-pooled ViT on one image with its own weights, in float32, and keeps what the
replacement model freezes: every head's attention pattern, every LayerNorm's scale σ (per position), the
embeddings (``ln_pre`` output: patch embedding + class token + position, normalised) and every MLP's input and
output. The arithmetic is open_clip's own (``_embeds``, ``ln_1 → MHA → ls_1``, ``ln_2 → mlp → ls_2``, ``ln_post``
on the CLS row, ``@ proj``); ``tests/test_graph.py`` checks the image embedding against ``encode_image``.

With the patterns and σ's frozen, a LayerNorm is the affine map ``w ⊙ (x − mean x)/σ + b`` and attention is
``Σ_h A_h (ln_1(x) W_v^h + b_v^h) W_o^h + b_o``: the residual stream is affine in what is written into it
(embeddings and MLP outputs). The head is made affine the same way at the image: ``ln_post`` with its σ frozen,
``proj``, then the L2 normalisation with the image embedding's norm frozen, then the text classifier times
CLIP's logit scale. At the real writes every frozen quantity has its real value, so the replacement forward
reproduces the real logits exactly (to float rounding) while being linear in the writes.

``Replacement.forward`` evaluates that affine model for given writes; ``Replacement.backward`` is its transpose,
batched over targets: given, per target row, a gradient injected at one (layer, position) MLP input or at the
final CLS residual, it returns the gradient at every MLP output and every embedding — what the edges of the
attribution graph are read from. Both run without autograd; memory is ``B × (L + 2) × P × d`` floats for B rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clt_pipe.precision import exact_float32
from torch.nn import functional as F


def _ln_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mu = x.mean(-1, keepdim=True)
    sigma = (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return mu, sigma


def frozen_ln(x: Tensor, w: Tensor, b: Tensor | None, sigma: Tensor) -> Tensor:
    """LayerNorm with its scale frozen: affine in x."""
    out = w * (x - x.mean(-1, keepdim=True)) / sigma
    return out if b is None else out + b


def frozen_ln_t(g: Tensor, w: Tensor, sigma: Tensor) -> Tensor:
    """Transpose of ``frozen_ln``'s linear part (centring is symmetric)."""
    u = w * g
    return (u - u.mean(-1, keepdim=True)) / sigma


def _scale_of(module, d: int, like: Tensor) -> Tensor:
    """LayerScale's gamma, or ones for an Identity."""
    gamma = getattr(module, "gamma", None)
    return like.new_ones(d) if gamma is None else gamma.detach().float()


@dataclass
class ViTWeights:
    """The float32 weights the replacement model reads, per layer."""

    ln1_w: list[Tensor]
    ln1_b: list[Tensor]
    ln1_eps: list[float]
    w_v: list[Tensor]  # [d, d]: v = h @ w_v.T + b_v
    b_v: list[Tensor]
    w_o: list[Tensor]  # [d, d]: o = u @ w_o.T + b_o
    b_o: list[Tensor]
    ls1: list[Tensor]
    ln2_w: list[Tensor]
    ln2_b: list[Tensor]
    ln2_eps: list[float]
    ls2: list[Tensor]
    n_heads: int
    post_w: Tensor
    post_b: Tensor
    post_eps: float
    proj: Tensor  # [d, E]

    @classmethod
    def of(cls, visual) -> ViTWeights:
        blocks = visual.transformer.resblocks
        d = visual.transformer.width
        f = {k: [] for k in ("ln1_w", "ln1_b", "ln1_eps", "w_v", "b_v", "w_o", "b_o", "ls1", "ln2_w", "ln2_b",
                             "ln2_eps", "ls2")}
        for blk in blocks:
            a = blk.attn
            w_in = a.in_proj_weight.detach().float()
            b_in = a.in_proj_bias.detach().float() if a.in_proj_bias is not None else w_in.new_zeros(3 * d)
            f["ln1_w"].append(blk.ln_1.weight.detach().float())
            f["ln1_b"].append(blk.ln_1.bias.detach().float())
            f["ln1_eps"].append(float(blk.ln_1.eps))
            f["w_v"].append(w_in[2 * d:])
            f["b_v"].append(b_in[2 * d:])
            f["w_o"].append(a.out_proj.weight.detach().float())
            f["b_o"].append(a.out_proj.bias.detach().float() if a.out_proj.bias is not None else w_in.new_zeros(d))
            f["ls1"].append(_scale_of(blk.ls_1, d, w_in))
            f["ln2_w"].append(blk.ln_2.weight.detach().float())
            f["ln2_b"].append(blk.ln_2.bias.detach().float())
            f["ln2_eps"].append(float(blk.ln_2.eps))
            f["ls2"].append(_scale_of(blk.ls_2, d, w_in))
        return cls(**f, n_heads=blocks[0].attn.num_heads, post_w=visual.ln_post.weight.detach().float(),
                   post_b=visual.ln_post.bias.detach().float(), post_eps=float(visual.ln_post.eps),
                   proj=visual.proj.detach().float())

    @property
    def n_layers(self) -> int:
        return len(self.w_v)


@dataclass
class Capture:
    """One image's real forward: the frozen quantities and the real values the graph is checked against."""

    emb: Tensor  # [P, d] ln_pre output: what each embedding node writes
    patterns: list[Tensor]  # per layer [H, P, P]: softmax(q kᵀ/√d_h), rows = queries
    sigma1: Tensor  # [L, P, 1]
    sigma2: Tensor  # [L, P, 1]
    mlp_in: Tensor  # [L, P, d] (ln_2 output)
    mlp_out: Tensor  # [L, P, d]
    resid_final: Tensor  # [d] CLS residual entering ln_post
    sigma_post: Tensor  # [1]
    embedding: Tensor  # [E] ln_post(resid_final) @ proj, not normalised


@exact_float32()
@torch.no_grad()
def capture(visual, image: Tensor) -> tuple[Capture, ViTWeights]:
    """Run the ViT on ``image`` [3, H, W] in float32 and keep what the replacement model needs."""
    W = ViTWeights.of(visual)
    x = visual._embeds(image[None].float())[0].float()  # [P, d]
    emb = x.clone()
    P, d = x.shape
    H = W.n_heads
    dh = d // H
    patterns, s1, s2, m_in, m_out = [], [], [], [], []
    for layer, blk in enumerate(visual.transformer.resblocks):
        mu, sig = _ln_stats(x, W.ln1_eps[layer])
        h = (x - mu) / sig * W.ln1_w[layer] + W.ln1_b[layer]
        a = blk.attn
        qkv = F.linear(h, a.in_proj_weight.float(), None if a.in_proj_bias is None else a.in_proj_bias.float())
        q, k, v = (t.reshape(P, H, dh).transpose(0, 1) for t in qkv.split(d, -1))
        A = torch.softmax(q @ k.transpose(1, 2) / dh ** 0.5, -1)  # [H, P, P]
        o = (A @ v).transpose(0, 1).reshape(P, d) @ W.w_o[layer].T + W.b_o[layer]
        x = x + W.ls1[layer] * o
        mu2, sig2 = _ln_stats(x, W.ln2_eps[layer])
        h2 = (x - mu2) / sig2 * W.ln2_w[layer] + W.ln2_b[layer]
        m = blk.mlp.float()(h2)
        x = x + W.ls2[layer] * m
        patterns.append(A)
        s1.append(sig)
        s2.append(sig2)
        m_in.append(h2)
        m_out.append(m)
    r = x[0]
    _, sp = _ln_stats(r, W.post_eps)
    e = frozen_ln(r, W.post_w, W.post_b, sp) @ W.proj
    cap = Capture(emb, patterns, torch.stack(s1), torch.stack(s2), torch.stack(m_in), torch.stack(m_out), r, sp, e)
    return cap, W


class Replacement:
    """The affine replacement model at one image (see the module docstring). ``head`` [C, E] is the text
    classifier; rows of ``readout`` map the final CLS residual to the logit nodes' inputs."""

    def __init__(self, cap: Capture, W: ViTWeights, classifier: Tensor, logit_scale: float):
        self.cap, self.W = cap, W
        self.clf = classifier.float()
        self.logit_scale = float(logit_scale)
        self.enorm = cap.embedding.norm().clamp_min(1e-12)

    @property
    def n_layers(self) -> int:
        return self.W.n_layers

    def head(self, resid_cls: Tensor) -> Tensor:
        """Affine head: final CLS residual [..., d] -> logits [..., C] (ln_post σ and ‖e‖ frozen)."""
        e = frozen_ln(resid_cls, self.W.post_w, self.W.post_b, self.cap.sigma_post) @ self.W.proj
        return self.logit_scale * (e / self.enorm) @ self.clf.T

    def head_t(self, u: Tensor) -> Tensor:
        """Gradient at the final CLS residual [..., d] of ``u · logits`` for class weights u [..., C]."""
        ge = (self.logit_scale / self.enorm) * (u @ self.clf) @ self.W.proj.T
        return frozen_ln_t(ge, self.W.post_w, self.cap.sigma_post)

    def _attn(self, layer: int, x: Tensor) -> Tensor:
        W = self.W
        h = frozen_ln(x, W.ln1_w[layer], W.ln1_b[layer], self.cap.sigma1[layer])
        v = h @ W.w_v[layer].T + W.b_v[layer]
        *lead, P, d = v.shape
        H = W.n_heads
        vh = v.reshape(*lead, P, H, d // H).transpose(-2, -3)  # [..., H, P, dh]
        u = (self.cap.patterns[layer] @ vh).transpose(-2, -3).reshape(*lead, P, d)
        return W.ls1[layer] * (u @ W.w_o[layer].T + W.b_o[layer])

    def forward(self, emb: Tensor, mlp_writes: Tensor) -> tuple[Tensor, Tensor]:
        """emb [..., P, d], mlp_writes [L, ..., P, d] -> (residual entering each ln_2 [L, ..., P, d],
        logits [..., C])."""
        x = emb
        mids = []
        for layer in range(self.n_layers):
            x = x + self._attn(layer, x)
            mids.append(x)
            x = x + self.W.ls2[layer] * mlp_writes[layer]
        return torch.stack(mids), self.head(x[..., 0, :])

    def mlp_input(self, layer: int, mid: Tensor) -> Tensor:
        """ln_2 of the residual ``mid`` with its σ frozen."""
        return frozen_ln(mid, self.W.ln2_w[layer], self.W.ln2_b[layer], self.cap.sigma2[layer])

    def ln2_t(self, layer: int, pos: Tensor, vec: Tensor) -> Tensor:
        """Gradient at the residual entering ln_2 of ``vec · mlp_input`` at positions ``pos`` [n] (vec [n, d])."""
        return frozen_ln_t(vec, self.W.ln2_w[layer], self.cap.sigma2[layer][pos])

    def backward(self, final: Tensor, mid_targets: list[tuple[Tensor, Tensor, Tensor]],
                 top: int | None = None) -> tuple[Tensor, Tensor]:
        """Transpose of the linear part, for B rows at once.

        ``final`` [B, d]: gradient injected at the final CLS residual (zeros for rows whose target is not a logit);
        ``mid_targets[l]`` = (rows [n], positions [n], vectors [n, d]): gradients injected at the residual entering
        layer l's ln_2. Returns (gradient at every MLP output [L, B, P, d], at every embedding [B, P, d]).
        ``top``: the highest layer any row injects at (``final`` counts as layer L−1); the pass starts there and
        the MLP outputs above it get zero gradient.
        """
        W = self.W
        B = final.shape[0]
        P, d = self.cap.emb.shape
        H = W.n_heads
        g = final.new_zeros(B, P, d)
        g[:, 0] = final
        top = self.n_layers - 1 if top is None else top
        if top < self.n_layers - 1 and final.any():
            raise ValueError("backward: a logit row needs the pass to start at the last layer")
        g_mlp = final.new_zeros(self.n_layers, B, P, d)
        for layer in reversed(range(top + 1)):
            g_mlp[layer] = g * W.ls2[layer]
            rows, pos, vec = mid_targets[layer]
            if rows.numel():
                g.index_put_((rows, pos), vec, accumulate=True)
            gu = (g * W.ls1[layer]) @ W.w_o[layer]  # [B, P, d]
            gu = gu.reshape(B, P, H, d // H).transpose(1, 2)  # [B, H, P, dh]
            gv = self.cap.patterns[layer].transpose(-1, -2) @ gu
            gh = gv.transpose(1, 2).reshape(B, P, d) @ W.w_v[layer]
            g = g + frozen_ln_t(gh, W.ln1_w[layer], self.cap.sigma1[layer])
        return g_mlp, g
