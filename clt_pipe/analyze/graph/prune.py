"""Influence on the target, pruning, and the strongest paths — circuit-tracer 0.5.0's rules (``graph.py``).

Influence: rows of |A| normalised to sum 1 (each node's input split into its sources' shares), then
``w @ (Â + Â² + …)`` for target weights ``w`` on the logit nodes. Pruning keeps the nodes holding
``node_threshold`` of the total influence (embeddings and logits always), then, in the graph of those, the edges
holding ``edge_threshold`` of the edge influence, then drops feature/error nodes left without outgoing edges and
features without incoming ones until nothing changes. This is circuit-tracer's ``prune_graph`` step for step (the
tests check it against circuit-tracer's own on our graphs); it is ours so that the command does not need
circuit-tracer installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ROW_BLOCK = 2048  # rows of the adjacency read at a time where a whole N × N temporary is not needed
NODE_THRESHOLD = 0.8  # circuit-tracer's prune_graph / create_graph_files defaults
EDGE_THRESHOLD = 0.98


def normalize_matrix(a: Tensor) -> Tensor:
    """|a| with rows scaled to sum 1: one N × N copy (divided in place, the same arithmetic as circuit-tracer's
    ``m / m.sum(...)``)."""
    m = a.abs()
    return m.div_(m.sum(dim=1, keepdim=True).clamp(min=1e-10))


def compute_influence(a: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    current = weights @ a
    influence = current
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ a
        influence = influence + current
    raise RuntimeError(f"influence did not converge after {max_iter} iterations (the graph has a cycle?)")


def find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """The score at which the descending cumulative share first reaches ``threshold`` (circuit-tracer's, for
    non-negative scores). Zeros are left out of the sort: an edge score matrix is nearly all zeros (N² = 394 M at
    ViT-B/32, whose full sort took a minute on 2 cores) and they sit at the sorted tail, so the sorted array is
    the sorted non-zeros followed by zeros. The total is summed over that whole array, zeros included, so that it
    rounds as circuit-tracer's does (a total over the non-zeros alone moved one edge of 70 k at ViT-B/32 sizes);
    a threshold past the non-zeros is 0, as in the full sort."""
    flat = scores.flatten()
    nz = flat[flat != 0]
    n_zero = flat.numel() - nz.numel()
    if nz.numel() == 0:
        return flat.new_zeros(())
    s = torch.sort(nz, descending=True).values
    total = torch.sum(torch.cat([s, s.new_zeros(n_zero)])) if n_zero else torch.sum(s)
    cum = torch.cumsum(s, 0) / total
    i = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype, device=cum.device)))
    if i >= len(s):
        return flat.new_zeros(()) if n_zero else s[-1]
    return s[i]


@dataclass
class Pruned:
    node_mask: Tensor  # [N] bool
    edge_mask: Tensor  # [N, N] bool
    cumulative_scores: Tensor  # [N] cumulative share of influence at each node's rank (circuit-tracer's)
    influence: Tensor  # [N] each node's influence on the target


def prune(adjacency: Tensor, target_weights: Tensor, n_features: int, n_tokens: int,
          node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD) -> Pruned:
    """circuit-tracer's ``prune_graph`` on a raw adjacency (rows = targets) whose last ``len(target_weights)``
    nodes are the logits and the ``n_tokens`` before them the embeddings."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0")
    n_logits = target_weights.shape[0]
    w = torch.zeros(adjacency.shape[0], device=adjacency.device)
    w[-n_logits:] = target_weights
    influence = compute_influence(normalize_matrix(adjacency), w)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[-n_logits - n_tokens:] = True
    # One N × N float copy at a time besides the adjacency (the edge scores are made in place in the normalised
    # pruned matrix): at ViT-B/32 sizes each copy is 1.6 GB.
    norm = adjacency.abs()
    norm[~node_mask] = 0
    norm[:, ~node_mask] = 0
    norm.div_(norm.sum(dim=1, keepdim=True).clamp(min=1e-10))
    edge_scores = norm.mul_((compute_influence(norm, w) + w)[:, None])
    edge_mask = edge_scores >= find_threshold(edge_scores, edge_threshold)
    del norm, edge_scores
    src_end = adjacency.shape[0] - n_logits - n_tokens
    old = node_mask.clone()
    node_mask[:src_end] &= edge_mask[:, :src_end].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.equal(node_mask, old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:src_end] &= edge_mask[:, :src_end].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
    s, order = torch.sort(influence, descending=True)
    cum = torch.zeros_like(influence)
    cum[order] = torch.cumsum(s, 0) / torch.sum(s)
    return Pruned(node_mask, edge_mask, cum, influence)


def graph_scores(adjacency: Tensor, influence: Tensor, target_weights: Tensor, errors: slice,
                 tokens: slice) -> dict[str, float]:
    """circuit-tracer's ``compute_graph_scores`` from the influence ``prune`` computed (same weights): the
    *replacement score*, the share of the influence reaching the graph's sources that ends at embeddings rather
    than error nodes (1: the target is explained through features alone), and the *completeness score*, each
    node's non-error share of its input weighted by its influence plus its target weight (partial credit)."""
    tok, err = float(influence[tokens].sum()), float(influence[errors].sum())
    row = torch.empty(adjacency.shape[0], device=adjacency.device)
    err_in = torch.empty_like(row)
    for r in range(0, adjacency.shape[0], ROW_BLOCK):  # rows in blocks: no N × N copy
        a = adjacency[r:r + ROW_BLOCK].abs()
        row[r:r + ROW_BLOCK], err_in[r:r + ROW_BLOCK] = a.sum(1), a[:, errors].sum(1)
    non_error = 1 - err_in / row.clamp(min=1e-10)
    w = torch.zeros(adjacency.shape[0], device=adjacency.device, dtype=influence.dtype)
    w[-target_weights.shape[0]:] = target_weights
    out = influence + w
    return {"replacement": tok / (tok + err) if tok + err > 0 else float("nan"),
            "completeness": float((non_error * out).sum() / out.sum())}


def strongest_paths(adjacency: Tensor, edge_mask: Tensor, order_key: Tensor, target: int, sources: Tensor,
                    k: int = 10) -> list[tuple[float, list[int]]]:
    """The ``k`` source nodes (of ``sources``) with the strongest single path to ``target`` over kept edges,
    each with that path. A path's strength is the product of its edges' shares of their target's input
    (|A| row-normalised); ``order_key`` ranks nodes so that every edge goes from a lower to a higher key."""
    N, dev = adjacency.shape[0], adjacency.device
    # Only nodes with a kept edge can be on a path: the search runs on them (a few thousand of N ≈ 20 k), each
    # edge's share still taken of its target's whole input.
    sub = torch.nonzero(edge_mask.any(0) | edge_mask.any(1)).squeeze(1)
    if not (sub == target).any():
        sub = torch.cat([sub, torch.tensor([target], device=dev)])
    rows = adjacency[sub].abs()
    share = rows[:, sub].div_(rows.sum(1, keepdim=True).clamp(min=1e-10)).mul_(edge_mask[sub][:, sub])
    del rows
    local = torch.full((N,), -1, dtype=torch.long, device=dev)
    local[sub] = torch.arange(len(sub), device=dev)
    best = torch.zeros(N, dtype=torch.float64, device=dev)
    nxt = torch.full((N,), -1, dtype=torch.long, device=dev)
    best[target] = 1.0
    key_sub = order_key.to(dev)[sub]
    for key in torch.unique(key_sub, sorted=True).flip(0):
        nodes = sub[key_sub == key]
        cand = share[:, local[nodes]].double() * best[sub][:, None]  # [targets, these sources]
        val, arg = cand.max(0)
        keep = (val > best[nodes]) & (nodes != target)
        best[nodes[keep]] = val[keep]
        nxt[nodes[keep]] = sub[arg[keep]]
    ranked = sorted(((float(best[s]), int(s)) for s in sources.tolist() if best[s] > 0), reverse=True)[:k]
    paths = []
    for score, s in ranked:
        path = [s]
        while path[-1] != target and nxt[path[-1]] >= 0 and len(path) <= N:
            path.append(int(nxt[path[-1]]))
        paths.append((score, path))
    return paths
