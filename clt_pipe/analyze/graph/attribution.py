"""The attribution graph of one image: nodes, direct-effect edges, and how exact they are.

Nodes, in circuit-tracer's order (so its ``Graph`` and viewer read ours as they are):

* features ``(layer, position, feature)`` with a non-zero code, sorted by layer, position, feature; a feature's
  *input* is its pre-activation, its *activation* the code it writes with (``a · W_dec[s][f, t−s] · out_scale[t]``
  into every MLP output t ≥ s at its position);
* errors ``(layer, position)``, layer-major: the real MLP output minus the CLT's reconstruction (b_dec included);
* embeddings, one per position (the ``ln_pre`` output: patch embedding + position, the class token at 0);
* logits: the target first, then the top classes by probability (circuit-tracer's rule: at most
  ``max_n_logits``, until their probabilities sum to ``desired_logit_prob``). A class node's input is its logit
  minus the mean logit (circuit-tracer demeans the same way); a ``--versus`` target is one node whose input is
  the difference of two logits.

Edges ``A[target, source]`` are direct effects in the replacement model (``replacement.py``): the source's write
times the gradient of the target's input at that write, with every other node held fixed — attention patterns,
LayerNorm scales and ‖embedding‖ frozen, features not passing anything through (their codes are the nodes).
Because the replacement model is affine, every node's input is exactly ``Σ_sources A[node, source] + constant``,
where the constant is the same model run with every node's write set to zero (what biases, b_dec and b_enc add).
``completeness_error`` measures that: max over feature and logit nodes of |input − Σ edges − constant| ÷ |input|.

Rows are computed B at a time (``batch_size``): one transposed pass through the frozen network per batch, as
circuit-tracer batches its backward passes over target nodes. The adjacency matrix is dense, N × N float32
(ViT-B/32 with k 32: N ≈ 20 k, 1.6 GB), as circuit-tracer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from clt_pipe.precision import exact_float32
from clt_pipe.analyze.graph.replacement import Replacement

MAX_N_LOGITS = 10  # circuit-tracer's attribute() defaults
DESIRED_LOGIT_PROB = 0.95
BATCH_SIZE = 256


@dataclass
class LogitNode:
    label: str
    index: int  # class index; n_classes + k for a virtual (difference) node, as circuit-tracer numbers them
    weights: Tensor  # [C]: the node's input is weights · logits
    prob: float  # softmax probability of the class (for a difference: p_a − p_b)


@dataclass
class AttributionGraph:
    active_features: Tensor  # [n, 3] long: layer, position, feature
    activations: Tensor  # [n]
    adjacency: Tensor  # [N, N] rows = targets, columns = sources
    inputs: Tensor  # [N] real input of every node (0 for errors and embeddings)
    constants: Tensor  # [N] what the zero-write replacement model gives each input
    logit_nodes: list[LogitNode]
    target_weights: Tensor  # [n_logits]: the target the pruning measures influence on
    n_layers: int
    n_pos: int
    logits: Tensor  # [C] real logits
    errors: Tensor  # [L, P, d] what each error node writes
    meta: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.active_features.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + len(self.logit_nodes)

    def target_rows(self) -> Tensor:
        """Node indices that have inputs: features and logits."""
        dev = self.adjacency.device
        return torch.cat([torch.arange(self.n_features, device=dev),
                          torch.arange(self.logit_start, self.n_nodes, device=dev)])

    def completeness_residual(self) -> Tensor:
        """|input − Σ edges − constant| per target row (features, then logits), in float64."""
        rows = self.target_rows()
        s = self.adjacency[rows].double().sum(1)
        return (self.inputs[rows].double() - s - self.constants[rows].double()).abs()

    def completeness_error(self) -> float:
        """max over feature and logit nodes of |input − Σ edges − constant| ÷ |input| (see the module docstring);
        the denominator is floored at 1e-3 × the RMS input of the node's kind, so that a node whose input is 0 by
        chance (a logit at the mean logit) measures rounding against its kind's scale rather than against 0."""
        rows = self.target_rows()
        res = self.completeness_residual()
        inp = self.inputs[rows].double().abs()
        nf = self.n_features
        floor = torch.empty_like(inp)
        for sl in (slice(0, nf), slice(nf, None)):
            if inp[sl].numel():
                floor[sl] = 1e-3 * inp[sl].pow(2).mean().sqrt().clamp_min(1e-30)
        return float((res / torch.maximum(inp, floor)).max()) if res.numel() else 0.0


def logit_nodes(logits: Tensor, class_names: list[str], target: int | None = None, versus: int | None = None,
                max_n_logits: int = MAX_N_LOGITS, desired_logit_prob: float = DESIRED_LOGIT_PROB) -> list[LogitNode]:
    """The logit nodes: the target first (predicted class when ``target`` is None; ``target − versus`` as one
    node when ``versus`` is given), then the salient classes not already there."""
    C = logits.shape[0]
    probs = torch.softmax(logits.double(), -1)
    top_p, top_i = probs.topk(min(max_n_logits, C))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), top_p.new_tensor(desired_logit_prob))) + 1
    salient = top_i[:cutoff].tolist()
    if target is None:
        target = int(probs.argmax())
    name = lambda c: class_names[c] if c < len(class_names) else str(c)  # noqa: E731
    demean = torch.full((C,), -1.0 / C, dtype=logits.dtype, device=logits.device)

    def class_node(c: int) -> LogitNode:
        w = demean.clone()
        w[c] += 1.0
        return LogitNode(name(c), c, w, float(probs[c]))

    if versus is not None:
        w = torch.zeros(C, dtype=logits.dtype, device=logits.device)
        w[target], w[versus] = 1.0, -1.0
        first = LogitNode(f"{name(target)} − {name(versus)}", C, w, float(probs[target] - probs[versus]))
        nodes = [first] + [class_node(c) for c in salient]
    else:
        nodes = [class_node(target)] + [class_node(c) for c in salient if c != target]
    return nodes


def feature_writes(clt, active: Tensor, n_layers: int) -> list[Tensor]:
    """Per source layer s: the raw-space decoder rows of its active features [n_s, L−s, d] (per unit code)."""
    out = []
    scale = clt.out_scale.detach().float()
    for s in range(n_layers):
        f = active[active[:, 0] == s, 2]
        out.append(clt.W_dec[s].detach().float()[f] * scale[s:, None])
    return out


def reconstruction(clt, dec: list[Tensor], active: Tensor, acts: Tensor, n_pos: int) -> Tensor:
    """[L, P, d] the CLT's reconstruction of every MLP output from exactly these feature writes, b_dec included."""
    L = len(dec)
    b_dec = clt.b_dec_or_zeros().detach().float()
    recon = b_dec[:, None, :].expand(L, n_pos, b_dec.shape[-1]).clone()
    k = 0
    for s in range(L):
        ns = dec[s].shape[0]
        pos = active[k:k + ns, 1]
        w = dec[s] * acts[k:k + ns, None, None]  # [n_s, L−s, d]
        for t in range(s, L):
            recon[t].index_add_(0, pos, w[:, t - s])
        k += ns
    return recon


def position_slots(active: Tensor, acts: Tensor, dec: list[Tensor], starts: list[int], n_pos: int):
    """Per source layer s: (feature ids [P, m] padded with −1, activation × decoder rows [P, m, (L−s)·d]), with
    the active features of layer s grouped by position, so that every edge from layer s into a batch of targets
    is one batched GEMM over positions instead of a gather of the targets' gradients per feature."""
    out = []
    for s, ds in enumerate(dec):
        ns = ds.shape[0]
        if ns == 0:
            out.append(None)
            continue
        pos = active[starts[s]:starts[s + 1], 1]
        counts = torch.bincount(pos, minlength=n_pos)
        m = int(counts.max())
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(ns, device=pos.device) - first[pos]  # features are sorted by position within a layer
        ids = torch.full((n_pos, m), -1, dtype=torch.long, device=pos.device)
        ids[pos, slot] = torch.arange(starts[s], starts[s + 1], device=pos.device)
        dcat = ds.new_zeros(n_pos, m, ds.shape[1] * ds.shape[2])
        dcat[pos, slot] = (ds * acts[starts[s]:starts[s + 1], None, None]).reshape(ns, -1)
        out.append((ids, dcat))
    return out


@exact_float32()
@torch.no_grad()
def build_graph(rep: Replacement, clt, class_names: list[str], target: int | None = None,
                versus: int | None = None, batch_size: int = BATCH_SIZE, max_n_logits: int = MAX_N_LOGITS,
                desired_logit_prob: float = DESIRED_LOGIT_PROB,
                feature_positions: Tensor | None = None) -> AttributionGraph:
    """Every node and every direct-effect edge of the image ``rep`` was captured at (see the module docstring).
    ``feature_positions`` ([P] bool) limits feature nodes to positions the CLT was trained on; elsewhere the MLP
    outputs stay whole in the error nodes (exactness does not depend on which features are nodes)."""
    cap = rep.cap
    L, P, d = cap.mlp_in.shape
    dev = cap.mlp_in.device
    x = cap.mlp_in.transpose(0, 1)  # [P, L, d] as the CLT reads it
    pre = clt.preactivations(x).float().transpose(0, 1)  # [L, P, F]
    z = clt.encode(x).float().transpose(0, 1)
    active = (z != 0).nonzero()  # [n, 3] sorted by layer, position, feature
    if feature_positions is not None:
        active = active[feature_positions.to(dev)[active[:, 1]]]
    acts = z[active[:, 0], active[:, 1], active[:, 2]]
    pre_act = pre[active[:, 0], active[:, 1], active[:, 2]]
    n = active.shape[0]
    dec = feature_writes(clt, active, L)
    starts = [0]
    for s in range(L):
        starts.append(starts[-1] + dec[s].shape[0])
    # the error node completes each MLP output: real output − the reconstruction from exactly these writes
    error = cap.mlp_out - reconstruction(clt, dec, active, acts, P)  # [L, P, d]
    b_dec = clt.b_dec_or_zeros().detach().float()  # [L, d]

    real_logits = rep.head(cap.resid_final)
    lnodes = logit_nodes(real_logits, class_names, target, versus, max_n_logits, desired_logit_prob)
    U = torch.stack([ln.weights.to(dev) for ln in lnodes])  # [n_logits, C]
    n_logits = len(lnodes)
    N = n + L * P + P + n_logits
    e0, t0, l0 = n, n + L * P, n + L * P + P

    # constants: the replacement model with every node's write zero (b_dec stays: it is no node)
    mids0, logits0 = rep.forward(torch.zeros_like(cap.emb), b_dec[:, None, :].expand(L, P, d))
    enc_scale = clt.in_scale.detach().float()
    W_enc = clt.W_enc.detach().float()
    inputs = torch.zeros(N, device=dev)
    constants = torch.zeros(N, device=dev)
    inputs[:n] = pre_act
    inputs[l0:] = U @ real_logits
    constants[l0:] = U @ logits0
    for s in range(L):
        sl = slice(starts[s], starts[s + 1])
        if starts[s + 1] == starts[s]:
            continue
        xs = (rep.mlp_input(s, mids0[s]) - clt.in_mean[s].float()) / enc_scale[s]  # [P, d]
        pos, f = active[sl, 1], active[sl, 2]
        constants[sl] = (xs[pos] * W_enc[s][:, f].T).sum(-1) + clt.b_enc[s].float()[f]

    slots = position_slots(active, acts, dec, starts, P)
    adjacency = torch.zeros(N, N, device=dev)
    # features are sorted by layer, so a batch of them spans few layers and its backward starts at the highest
    rows_all = torch.cat([torch.arange(n, device=dev), torch.arange(l0, N, device=dev)])
    row_layer = torch.cat([active[:, 0], torch.full((n_logits,), L - 1, device=dev, dtype=active.dtype)])
    head_grads = rep.head_t(U)  # [n_logits, d]
    for b0 in range(0, rows_all.numel(), batch_size):
        rows = rows_all[b0:b0 + batch_size]
        top = int(row_layer[b0:b0 + batch_size].max())
        B = rows.numel()
        final = torch.zeros(B, d, device=dev)
        is_logit = rows >= l0
        final[is_logit] = head_grads[rows[is_logit] - l0]
        mid_targets = []
        feat_rows = torch.nonzero(~is_logit).squeeze(1)
        tgt = active[rows[feat_rows]] if feat_rows.numel() else active[:0]
        for layer in range(L):
            m = tgt[:, 0] == layer
            r, p, f = feat_rows[m], tgt[m, 1], tgt[m, 2]
            vec = W_enc[layer][:, f].T / enc_scale[layer]
            mid_targets.append((r, p, rep.ln2_t(layer, p, vec)))
        g_mlp, g_emb = rep.backward(final, mid_targets, top=top)
        block = torch.zeros(B, N, device=dev)
        block[:, t0:l0] = torch.einsum("bpd,pd->bp", g_emb, cap.emb)
        block[:, e0:t0] = torch.einsum("lbpd,lpd->blp", g_mlp, error).reshape(B, L * P)
        gp = g_mlp.permute(2, 1, 0, 3).contiguous()  # [P, B, L, d]: per position, a unit write into each layer
        # a feature target reads sources below its own layer; a logit reads every layer
        for s in range(L if bool(is_logit.any()) else top):
            if slots[s] is None:
                continue
            ids, dcat = slots[s]  # [P, m], [P, m, (L−s)·d]
            e = torch.bmm(gp[:, :, s:].reshape(P, B, (L - s) * d), dcat.transpose(1, 2))  # [P, B, m]
            keep = ids >= 0
            block[:, ids[keep]] = e.permute(1, 0, 2)[:, keep]
        adjacency[rows] = block
    return AttributionGraph(active, acts, adjacency, inputs, constants, lnodes, _target_weights(n_logits, dev),
                            L, P, real_logits, error,
                            meta={"n_classes": int(real_logits.shape[0]), "batch_size": batch_size})


def _target_weights(n_logits: int, dev) -> Tensor:
    w = torch.zeros(n_logits, device=dev)
    w[0] = 1.0
    return w


@exact_float32()
def replacement_logits(rep: Replacement, graph: AttributionGraph, clt) -> Tensor:
    """The replacement model run forward on the graph's own nodes (embeddings, feature writes + b_dec, errors):
    it gives the real logits back."""
    L, P, d = graph.errors.shape
    dec = feature_writes(clt, graph.active_features, L)
    writes = reconstruction(clt, dec, graph.active_features, graph.activations, P) + graph.errors
    return rep.forward(rep.cap.emb, writes)[1]
