"""AuxK on the dead columns only (clt/losses.aux_loss) against the definition it replaced: a top-k over all F
latents with the live ones masked out, decoded through the full decoders."""

from __future__ import annotations

import pytest
import torch

from clt_pipe.clt import losses
from clt_pipe.clt.losses import _normalised_mse, aux_loss
from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.sparse_decode import rows_decode_triangle
from clt_pipe.clt.spec import CLTSpec

L, D, F, K, B = 4, 12, 48, 5, 16


def reference_aux(model: CrossLayerTranscoder, pre, residual, dead_mask, aux_k: int) -> torch.Tensor:
    """The previous implementation, written densely: masked top-k over F, dense codes, full decoders."""
    has_dead = dead_mask.any(-1)
    if not has_dead.any():
        return residual.new_zeros(())
    signed = model.spec.kind.signed
    score = (pre.detach().abs() if signed else pre.detach()).masked_fill(~dead_mask, float("-inf"))
    idx = score.topk(min(aux_k, F), dim=-1).indices
    val = pre.gather(-1, idx)
    if not signed:
        val = torch.relu(val)
    val = val * dead_mask[None].expand_as(pre).gather(-1, idx).to(val.dtype)
    z = val.new_zeros(pre.shape).scatter(-1, idx, val)
    recon = residual.new_zeros(residual.shape)
    for s in range(L):
        if has_dead[s]:
            recon[:, s:] += (z[:, s] @ model.W_dec[s].view(F, -1)).view(B, L - s, D)
    return _normalised_mse(recon, residual)[has_dead.cumsum(0) > 0].sum()


def grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=False)
    loss = fn()
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("sparsifier", ["relu_topk", "abs_topk", "batchtopk"])
# dead latents in layers 0 and 2: below aux_k (all selected), above it, every latent, and one layer of each kind
# (a GEMM through all its dead rows beside a top-k one, or a gathered one when the gather is forced)
@pytest.mark.parametrize("n_dead", [(3, 3), (20, 20), (F, F), (3, 20)], ids=["3", "20", "all", "3+20"])
@pytest.mark.parametrize("gather_columns", [39, 0])  # the shipped rule, and the gather forced
@pytest.mark.parametrize("decode", ["sparse", "dense"])
@pytest.mark.parametrize("inplace", [True, False])  # gradients added into .grad in place, or returned
def test_auxk_on_dead_columns_matches_masked_topk_over_all_latents(sparsifier, n_dead, decode, gather_columns,
                                                                    inplace, monkeypatch):
    monkeypatch.setattr(losses, "GATHER_COLUMNS", gather_columns)
    if decode == "sparse" and sparsifier == "batchtopk":
        pytest.skip("the sparse decode needs per-token TopK")
    aux_k = 8
    torch.manual_seed(0)
    model = CrossLayerTranscoder(CLTSpec(L, D, F, sparsifier, K))
    model.inplace_decoder_grads = inplace
    with torch.no_grad():
        model.b_enc.normal_(0, 0.5)
    model.materialize_grads()
    x = torch.randn(B, L, D)
    residual = torch.randn(B, L, D)
    g = torch.Generator().manual_seed(1)
    dead = torch.zeros(L, F, dtype=torch.bool)
    for s, n in zip((0, 2), n_dead):  # layers 1 and 3 have none: their targets are reachable only from earlier ones
        dead[s, torch.randperm(F, generator=g)[:n]] = True

    new = grads(model, lambda: aux_loss(model, model.standardize(x), residual, dead, aux_k, decode))
    old = grads(model, lambda: reference_aux(model, model.preactivations(x), residual, dead, aux_k))
    assert new["loss"] > 0
    for name in new:
        torch.testing.assert_close(new[name], old[name], rtol=1e-4, atol=1e-6, msg=name)
    # only dead latents' decoder rows receive a gradient
    for s in range(L):
        live_rows = model.W_dec[s].grad[~dead[s]]
        assert (live_rows == 0).all()


def test_auxk_zero_without_dead_latents():
    model = CrossLayerTranscoder(CLTSpec(L, D, F, "relu_topk", K))
    x_std = model.standardize(torch.randn(B, L, D))
    assert aux_loss(model, x_std, torch.randn(B, L, D), torch.zeros(L, F, dtype=torch.bool), 8).item() == 0


def test_rows_decode_matches_dense_and_adds_into_existing_grad():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(F, 3, D))  # source 0 of a 3-layer CLT: writes layers 0..2
    rows = torch.tensor([5, 0, 17, 40])
    codes = torch.randn(B, 4, requires_grad=True)
    w.grad = torch.ones_like(w)  # an existing gradient: the rows' part is added to it, the rest untouched
    out = rows_decode_triangle([(0, rows, codes, w)], 3).view(B, -1)
    ref_codes = codes.detach().clone().requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    ref = ref_codes @ w_ref.view(F, -1)[rows]
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(codes.grad, ref_codes.grad)
    torch.testing.assert_close(w.grad, 1 + w_ref.grad)


@pytest.mark.parametrize("n_dead", [3, 8])  # <= aux_k: above it, bf16 rounding may change which latents win the top-k
def test_auxk_under_bf16_autocast_follows_the_float32_definition(n_dead):
    """The CUDA training path runs AuxK's GEMMs in bf16 (autocast); CPU autocast exercises the same code. Value and
    gradients stay within bf16 rounding of the float32 definition; gradients come back in float32."""
    torch.manual_seed(0)
    model = CrossLayerTranscoder(CLTSpec(L, D, F, "relu_topk", K))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.5)
    model.materialize_grads()
    x, residual = torch.randn(B, L, D), torch.randn(B, L, D)
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[0, :n_dead] = True
    dead[2, 5:5 + n_dead] = True

    def low():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return aux_loss(model, model.standardize(x), residual, dead, 8, "dense")

    new = grads(model, low)
    old = grads(model, lambda: reference_aux(model, model.preactivations(x), residual, dead, 8))
    for name in new:
        assert new[name].dtype == torch.float32, name
        err = (new[name] - old[name]).norm() / old[name].norm().clamp_min(1e-12)
        assert err < 0.02, (name, float(err))
    assert (new["W_dec.1"] == 0).all() and (new["W_dec.3"] == 0).all()  # no dead latents there
