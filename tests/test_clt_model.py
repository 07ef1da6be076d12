"""CLT module: sparsifiers, sparse vs dense decode, triangularity, losses, standardisation fold, export."""

from __future__ import annotations

import math

import pytest
import torch

from clt_pipe.clt import sparsifiers as sp
from clt_pipe.clt.export import fold_standardization, load_clt, save_clt
from clt_pipe.clt.losses import LossConfig, clt_loss
from clt_pipe.clt.model import CrossLayerTranscoder, auto_decode
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.clt.spec import SPARSIFIERS
from clt_pipe.config import FitConfig
from clt_pipe.errors import CheckpointError

L, D, F, K, B = 4, 12, 48, 5, 16


def make(sparsifier: str, dec_bias: bool = False, seed: int = 0, standardize: bool = False) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    model = CrossLayerTranscoder(CLTSpec(L, D, F, sparsifier, K, dec_bias=dec_bias))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.2)
        if model.b_dec is not None:
            model.b_dec.normal_(0, 0.5)
        for w in model.W_dec:
            w.mul_(5.0)  # larger than init so that every term matters in the comparisons below
    if standardize:
        model.set_standardization(torch.randn(L, D) * 0.5, torch.rand(L) * 2 + 0.5, torch.rand(L) * 3 + 0.2)
    return model


def batch(seed: int = 1, n: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D, generator=g) * 1.5 + 0.3


# ------------------------------------------------------------------ sparse vs dense decode


@pytest.mark.parametrize("sparsifier", ["relu_topk", "abs_topk"])
def test_sparse_and_dense_decode_agree_in_value_and_gradient(sparsifier: str) -> None:
    x, y = batch(1), batch(2)
    grads = {}
    outs = {}
    for mode in ("sparse", "dense"):
        model = make(sparsifier, dec_bias=True, standardize=True)
        out = model(x, decode=mode)
        out.top_val.retain_grad()
        loss = ((out.recon - y) ** 2).sum()
        loss.backward()
        outs[mode] = out.recon.detach()
        grads[mode] = {
            "W_enc": model.W_enc.grad.clone(),
            "b_enc": model.b_enc.grad.clone(),
            "top_val": out.top_val.grad.clone(),
            **{f"W_dec{s}": w.grad.clone() for s, w in enumerate(model.W_dec)},
        }
    torch.testing.assert_close(outs["sparse"], outs["dense"], rtol=1e-5, atol=1e-5)
    for name, g in grads["sparse"].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads["dense"][name], rtol=1e-4, atol=1e-4, msg=name)


def test_auto_decode_picks_sparse_for_topk_and_dense_otherwise() -> None:
    assert make("relu_topk")(batch()).z_dense is None  # sparse path: dense codes not built
    assert make("jumprelu")(batch()).z_dense is not None
    with pytest.raises(Exception, match="sparse"):
        make("jumprelu")(batch(), decode="sparse")
    # On a GPU under bf16 autocast the dense GEMM is the faster decode even for TopK codes (measured on an
    # H100); in fp32 there, and on CPU, the sparse gather is.
    assert auto_decode(True, "cuda", low_precision=True) == "dense"
    assert auto_decode(True, "cuda", low_precision=False) == "sparse"
    assert auto_decode(True, "cpu", low_precision=True) == "sparse"
    assert auto_decode(False, "cpu", low_precision=False) == "dense"


# ------------------------------------------------------------------ sparsifiers


def test_relu_topk_keeps_exactly_k_per_token_and_layer() -> None:
    model = make("relu_topk")
    with torch.no_grad():
        model.b_enc.fill_(10.0)  # every pre-activation positive: all k kept slots fire
    out = model(batch())
    assert out.top_idx.shape == (B, L, K)
    assert ((out.z != 0).sum(-1) == K).all()
    # the kept ones are the k largest
    kth = out.pre.topk(K, dim=-1).values[..., -1:]
    assert ((out.z != 0) == (out.pre >= kth)).all()
    torch.testing.assert_close(out.l0(), torch.full((L,), float(K)))


def test_relu_topk_drops_negative_values() -> None:
    model = make("relu_topk")
    with torch.no_grad():
        model.b_enc.fill_(-100.0)
    out = model(batch())
    assert (out.top_val == 0).all() and (out.z == 0).all() and (out.l0() == 0).all()
    assert not out.fired().any()


def test_abs_topk_keeps_signs() -> None:
    out = make("abs_topk")(batch())
    nz = out.z != 0
    assert (nz.sum(-1) == K).all()
    assert (out.z < 0).any() and (out.z > 0).any()
    torch.testing.assert_close(out.z[nz], out.pre[nz])  # values are the signed pre-activations
    kth = out.pre.abs().topk(K, dim=-1).values[..., -1:]
    assert (nz == (out.pre.abs() >= kth)).all()


def test_batchtopk_keeps_b_times_k_per_layer_in_training_and_thresholds_in_eval() -> None:
    model = make("batchtopk")
    with torch.no_grad():
        model.b_enc.fill_(5.0)  # all positive, so exactly B*k fire
    x = batch()
    model.train()
    z = model.encode(x)  # no update
    out = model(x)  # updates the running threshold
    assert ((out.z != 0).sum((0, 2)) == B * K).all()
    min_kept = torch.stack([out.z[:, l][out.z[:, l] != 0].min() for l in range(L)])
    torch.testing.assert_close(model.bt_threshold, min_kept)  # first update = the observed value
    assert model.bt_updates.item() == 1
    assert (z != 0).sum().item() == B * K * L
    # eval: a fixed per-layer threshold, independent of the rest of the batch
    model.eval()
    with torch.no_grad():
        model.bt_threshold.copy_(torch.tensor([4.0, 4.5, 5.0, 5.5]))
    out = model(x)
    pre = out.pre
    expect = torch.where(pre > model.bt_threshold[None, :, None], pre, torch.zeros_like(pre))
    torch.testing.assert_close(out.z, expect)
    torch.testing.assert_close(model(x[:3]).z, expect[:3])
    assert model.bt_updates.item() == 1  # eval leaves the running threshold alone


def test_batchtopk_threshold_is_a_running_average() -> None:
    running, n = torch.zeros(2), torch.zeros((), dtype=torch.long)
    sp.ema_update(running, n, torch.tensor([1.0, 2.0]))
    sp.ema_update(running, n, torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(running, torch.tensor([2.0, 3.0]))


def test_jumprelu_threshold_gets_ste_gradient_and_l0_counts_actives() -> None:
    theta = torch.full((3,), 0.5, requires_grad=True)
    pre = torch.tensor([[0.49, 0.52, 2.0], [0.1, 0.6, 0.51]], requires_grad=True)
    z = sp.jumprelu(pre, theta, 0.05)
    torch.testing.assert_close(z.detach(), torch.tensor([[0.0, 0.52, 2.0], [0.0, 0.6, 0.51]]))
    z.sum().backward()
    # d/dθ = -(θ/ε) Σ K((pre-θ)/ε): entries within ε/2 of θ count: (0.49, 0.52 | 0.51) -> cols 0, 1, 2
    torch.testing.assert_close(theta.grad, torch.tensor([-10.0, -10.0, -10.0]))
    torch.testing.assert_close(pre.grad, (z.detach() != 0).float())

    theta.grad = None
    active = sp.step(pre, theta, 0.05)
    assert active.sum().item() == 4
    active.sum().backward()
    assert (theta.grad < 0).all()  # raising θ lowers the count

    # through the model and the loss: log_threshold is trained by the L0 penalty
    model = make("jumprelu")
    cfg = LossConfig(aux_k=0, aux_coef=0.0, l0_coef=1.0, l0_penalty="l0", tanh_scale=4.0)
    with torch.no_grad():
        model.log_threshold.fill_(math.log(0.03))
    out = model(batch())
    loss, metrics = clt_loss(model, out, batch(2), dead_mask=None, cfg=cfg)
    n_active = (out.pre > 0.03).float().sum(-1).mean(0).sum()
    torch.testing.assert_close(metrics["sparsity"], n_active)
    torch.testing.assert_close(metrics["l0"].sum(), n_active)
    loss.backward()
    assert model.log_threshold.grad.abs().sum() > 0


def test_tanh_penalty_uses_decoder_norms() -> None:
    model = make("jumprelu")
    out = model(batch())
    cfg = LossConfig(aux_k=0, aux_coef=0.0, l0_coef=1.0, l0_penalty="tanh", tanh_scale=4.0)
    _, metrics = clt_loss(model, out, batch(2), dead_mask=None, cfg=cfg)
    expect = torch.tanh(4.0 * out.z.abs() * model.decoder_norms()).sum(-1).mean(0).sum()
    torch.testing.assert_close(metrics["sparsity"], expect.detach())
    assert metrics["sparsity"] > 0


# ------------------------------------------------------------------ triangular structure


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
def test_source_layer_never_writes_to_earlier_targets(sparsifier: str) -> None:
    model = make(sparsifier, dec_bias=True, standardize=True).eval()
    x = batch()
    base = model(x).recon
    for i in range(L):
        x2 = x.clone()
        x2[:, i] += torch.randn(B, D) * 3
        recon = model(x2).recon
        torch.testing.assert_close(recon[:, :i], base[:, :i], rtol=0, atol=0)
        assert not torch.allclose(recon[:, i], base[:, i])


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
def test_decode_to_and_contributions_match_forward(sparsifier: str) -> None:
    model = make(sparsifier, dec_bias=True, standardize=True).eval()
    x = batch()
    out = model(x)
    z = model.encode(x)
    torch.testing.assert_close(z, out.z)
    for target in range(L):
        zs = [z[:, s] for s in range(L)]
        torch.testing.assert_close(model.decode_to(zs, target), out.recon[:, target], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_layer(x[:, target], target), z[:, target])
    torch.testing.assert_close(model.decode(z), out.recon, rtol=1e-5, atol=1e-5)
    # a None source does not write: decode_to equals the sum of the remaining sources' contributions
    contrib = model.contributions(x)
    assert contrib.shape == (B, L, L, D)
    for i in range(L):
        for j in range(i):
            assert (contrib[:, i, j] == 0).all()
    torch.testing.assert_close(contrib.sum(1), out.recon - model.b_dec, rtol=1e-5, atol=1e-5)
    zs = [None, z[:, 1], None, z[:, 3]]
    expect = contrib[:, 1, 3] + contrib[:, 3, 3] + model.b_dec[3]
    torch.testing.assert_close(model.decode_to(zs, 3), expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ standardisation fold and export


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
def test_fold_and_save_load_round_trip_reproduces_raw_reconstructions(sparsifier: str, tmp_path) -> None:
    model = make(sparsifier, dec_bias=sparsifier != "relu_topk", standardize=True)
    if sparsifier == "batchtopk":
        model.train()
        model(batch(5, n=64))  # learn a threshold
    model.eval()
    x = batch(3)
    ref = model(x).recon.detach()

    folded = fold_standardization(model)
    assert (folded.in_mean == 0).all() and (folded.in_scale == 1).all() and (folded.out_scale == 1).all()
    torch.testing.assert_close(folded(x).recon.detach(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

    save_clt(model, tmp_path / "clt", extra_meta={"note": "test"})
    loaded = load_clt(tmp_path / "clt")
    assert loaded.spec == model.spec
    got = loaded(x).recon.detach()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-5, rel.item()
    assert (tmp_path / "clt" / "W_enc_0.safetensors").is_file()
    assert (tmp_path / "clt" / f"W_dec_{L - 1}.safetensors").is_file()

    # unfolded save keeps the training parametrisation exactly
    save_clt(model, tmp_path / "raw", fold=False)
    raw = load_clt(tmp_path / "raw")
    torch.testing.assert_close(raw.out_scale, model.out_scale)
    torch.testing.assert_close(raw(x).recon.detach(), ref, rtol=1e-5, atol=1e-5)


def test_saved_tensors_use_circuit_tracer_keys_and_shapes(tmp_path) -> None:
    from safetensors.torch import load_file

    model = make("jumprelu")
    save_clt(model, tmp_path)
    enc = load_file(str(tmp_path / "W_enc_1.safetensors"))
    dec = load_file(str(tmp_path / "W_dec_1.safetensors"))
    assert set(enc) == {"W_enc_1", "b_enc_1", "b_dec_1", "threshold_1"}
    assert enc["W_enc_1"].shape == (F, D) and enc["threshold_1"].shape == (F,)
    assert dec["W_dec_1"].shape == (F, L - 1, D)
    torch.testing.assert_close(enc["threshold_1"], model.log_threshold[1].exp().detach())


def test_load_clt_rejects_truncated_missing_and_misshaped_files(tmp_path) -> None:
    model = make("relu_topk")
    save_clt(model, tmp_path)
    victim = tmp_path / "W_dec_2.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="W_dec_2"):
        load_clt(tmp_path)
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_clt(tmp_path)
    (tmp_path / "clt.json").unlink()
    with pytest.raises(CheckpointError, match="clt.json"):
        load_clt(tmp_path)

    other = CrossLayerTranscoder(CLTSpec(L, D, F + 8, "relu_topk", K))
    save_clt(other, tmp_path / "x")
    (tmp_path / "x" / "W_enc_0.safetensors").write_bytes((tmp_path / "W_enc_0.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="shape"):
        load_clt(tmp_path / "x")


def test_spec_dict_round_trip_rejects_unknown_keys() -> None:
    spec = CLTSpec(L, D, F, "abs_topk", K, dec_bias=True)
    assert CLTSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(CheckpointError, match="bogus"):
        CLTSpec.from_dict({**spec.to_dict(), "bogus": 1})
    with pytest.raises(CheckpointError):
        CLTSpec.from_dict({**spec.to_dict(), "sparsifier": "nope"})


# ------------------------------------------------------------------ losses


def test_fvu_of_perfect_reconstruction_is_zero() -> None:
    model = make("relu_topk", dec_bias=True, standardize=True)
    x = batch()
    out = model(x)
    cfg = LossConfig.from_fit_config(FitConfig())
    loss, metrics = clt_loss(model, out, out.recon.detach(), dead_mask=None, cfg=cfg)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert (metrics["fvu"].abs() < 1e-6).all()
    torch.testing.assert_close(metrics["cos"], torch.ones(L))
    # and a zero reconstruction explains nothing beyond the batch mean
    y = batch(7)
    _, m2 = clt_loss(model, out, y, dead_mask=None, cfg=cfg)
    assert (m2["fvu"] > 0).all()


def test_auxk_is_zero_without_dead_latents_and_positive_with_them() -> None:
    model = make("relu_topk")
    x, y = batch(), batch(2)
    cfg = LossConfig(aux_k=8, aux_coef=1.0, l0_coef=0.0, l0_penalty="l0", tanh_scale=4.0)
    out = model(x)
    _, m_none = clt_loss(model, out, y, dead_mask=None, cfg=cfg)
    _, m_empty = clt_loss(model, out, y, dead_mask=torch.zeros(L, F, dtype=torch.bool), cfg=cfg)
    assert m_none["aux"].item() == 0 and m_empty["aux"].item() == 0

    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[1, :20] = True  # dead latents in layer 1 only: they can reach targets 1..3
    with torch.no_grad():
        model.b_enc[1, :20] = 3.0  # positive pre-activations, so the dead latents produce an aux reconstruction
    out = model(x)
    loss, m_dead = clt_loss(model, out, y, dead_mask=dead, cfg=cfg)
    assert m_dead["aux"].item() > 0
    loss.backward()
    # the gradient reaches the dead latents' decoder rows, and not other sources' rows through aux
    assert model.W_dec[1].grad[:20].abs().sum() > 0


def test_metrics_shapes_and_fired() -> None:
    model = make("abs_topk")
    out = model(batch())
    _, m = clt_loss(model, out, batch(2), dead_mask=None, cfg=LossConfig())
    for key in ("fvu", "cos", "l0", "mse"):
        assert m[key].shape == (L,) and not m[key].requires_grad
    assert m["fired"].dtype == torch.bool and m["fired"].shape == (L, F)
    torch.testing.assert_close(m["fired"], (out.z != 0).any(0))
    torch.testing.assert_close(m["l0"], torch.full((L,), float(K)))


# ------------------------------------------------------------------ sparse_decode Function


def _dense_decode_ref(idx: torch.Tensor, val: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    z = torch.zeros(idx.shape[0], weight.shape[0], dtype=val.dtype).scatter_add(1, idx, val)
    return z @ weight.reshape(weight.shape[0], -1)


def _codes(n: int = 5, n_feat: int = 7, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_feat, (n, k), generator=g)  # duplicates within and across rows on purpose
    return idx, torch.randn(n, k, generator=g, dtype=torch.float64)


def test_sparse_decode_gradcheck_and_matches_dense_formula() -> None:
    from clt_pipe.clt.sparse_decode import sparse_decode

    idx, val = _codes()
    w = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    val.requires_grad_(True)
    # .grad is None throughout (gradcheck uses autograd.grad): the always-dense return path
    assert torch.autograd.gradcheck(lambda v, ww: sparse_decode(idx, v, ww), (val, w))
    go = torch.randn(5, 6, dtype=torch.float64)
    ref = torch.autograd.grad(_dense_decode_ref(idx, val, w), (val, w), go)
    got = torch.autograd.grad(sparse_decode(idx, val, w), (val, w), go)
    torch.testing.assert_close(sparse_decode(idx, val, w), _dense_decode_ref(idx, val, w))
    for a, b in zip(got, ref):
        assert a.layout == torch.strided
        torch.testing.assert_close(a, b)


def test_sparse_decode_accumulates_in_place_into_existing_grad() -> None:
    from clt_pipe.clt.sparse_decode import sparse_decode

    idx, val = _codes(seed=1)
    w = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    go1, go2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    ref = sum(torch.autograd.grad(_dense_decode_ref(idx, val, w), w, go)[0] for go in (go1, go2))

    sparse_decode(idx, val, w).backward(go1)  # .grad None: dense gradient returned, becomes .grad
    assert w.grad is not None and w.grad.layout == torch.strided
    ptr = w.grad.data_ptr()
    sparse_decode(idx, val, w).backward(go2)  # .grad exists: rows added in place
    assert w.grad.data_ptr() == ptr and w.grad.layout == torch.strided
    torch.testing.assert_close(w.grad, ref)

    # autograd.grad must neither touch .grad nor lose the contribution
    before = w.grad.clone()
    (g,) = torch.autograd.grad(sparse_decode(idx, val, w), w, go1)
    torch.testing.assert_close(w.grad, before)
    torch.testing.assert_close(g, torch.autograd.grad(_dense_decode_ref(idx, val, w), w, go1)[0])
    # backward(inputs=...) that leaves the weight out does not touch .grad either
    v = val.clone().requires_grad_(True)
    sparse_decode(idx, v, w).backward(go1, inputs=[v])
    torch.testing.assert_close(w.grad, before)
    assert v.grad is not None


def test_model_sparse_decode_with_materialized_grads_matches_dense_over_two_steps() -> None:
    x = batch(1)
    grads = {}
    for mode in ("sparse", "dense"):
        model = make("relu_topk", dec_bias=True, standardize=True)
        model.materialize_grads()
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        ptrs = [w.grad.data_ptr() for w in model.W_dec]
        for seed in (2, 3):  # two backward calls accumulate
            (model(x, decode=mode).recon - batch(seed)).pow(2).sum().backward()
        assert [w.grad.data_ptr() for w in model.W_dec] == ptrs
        grads[mode] = [w.grad.clone() for w in model.W_dec]
        model.zero_grad(set_to_none=False)
        assert all(not w.grad.any() for w in model.W_dec)
    for a, b in zip(grads["sparse"], grads["dense"]):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sparse_decode_under_cpu_autocast_outputs_autocast_dtype() -> None:
    from clt_pipe.clt.sparse_decode import sparse_decode

    idx, val = _codes()
    w = torch.randn(7, 6, requires_grad=True)
    v = val.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_decode(idx, v.bfloat16(), w)
        dense = v.bfloat16() @ w[:3]  # what a dense GEMM gives under autocast
    assert out.dtype == dense.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and v.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), _dense_decode_ref(idx, v.detach(), w.detach()), rtol=2e-2, atol=2e-2)
