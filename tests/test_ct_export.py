"""`clt-pipe export` for circuit-tracer: TopK calibration (or refusal), agreement, and a round trip through
circuit-tracer's own public loaders when it is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clt_pipe.cli import app
from clt_pipe.analyze.circuit_tracer import HUB_CONFIG, export_for_circuit_tracer
from clt_pipe.analyze.ct_hooks import MLP_IN
from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.config import FitConfig, build
from clt_pipe.errors import CltPipeError
from clt_pipe.clt.rundir import save_fitted
from clt_pipe.fit.trainer import run_fit
from clt_pipe.testing.synthstore import CrossLayerData, write_store

L, D, T = 4, 32, 8
# A relu_topk CLT exported as calibrated JumpReLU: measured 0.73-0.75 R² against our reconstruction per layer on
# this data (the exact sparsifiers reproduce to ~1e-15); the bound leaves room for other seeds and BLAS.
TOPK_R2_VS_OURS = 0.6

try:
    import circuit_tracer  # noqa: F401
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt
    HAVE_CT = True
    CT_WHY = ""
except Exception as e:  # noqa: BLE001 - any import failure means: skip, and say why
    HAVE_CT = False
    CT_WHY = (f"circuit-tracer is not importable ({type(e).__name__}: {e}); "
              "pip install -c constraints.txt circuit-tracer")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("ct") / "s.zarr")
    write_store(url, 256, T, L, D, CrossLayerData(T, L, D, seed=1), chunk_mb=1 / 16)
    return url


def _fit(store: str, out: Path, sparsifier: str) -> Path:
    run_fit(build(FitConfig, dict(store=store, out=str(out), n_features=64, k=4, sparsifier=sparsifier, steps=60,
                                  batch_size=64, lr=3e-3, warmup_steps=5, log_every=10, checkpoint_every=1000,
                                  dead_tokens=2000, shuffle_chunks=3, read_threads=2, device="cpu", seed=3)))
    return out


@pytest.fixture(scope="module")
def topk_run(store, tmp_path_factory) -> Path:
    return _fit(store, tmp_path_factory.mktemp("topk") / "run", "relu_topk")


def test_topk_export_without_store_is_refused(topk_run, tmp_path):
    with pytest.raises(CltPipeError, match="circuit-tracer has no TopK.*--store"):
        export_for_circuit_tracer(topk_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    proc = subprocess.run([sys.executable, "-m", "clt_pipe", "export", str(topk_run), str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 2 and "--store" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_abs_topk_is_refused(store, tmp_path):
    run = tmp_path / "abs"
    save_fitted(run, CrossLayerTranscoder(CLTSpec(L, D, 64, "abs_topk", 4)), {"store": {}})
    with pytest.raises(CltPipeError, match="signed"):
        export_for_circuit_tracer(run, tmp_path / "out", store, input_hook=MLP_IN)


def test_topk_export_agrees_within_the_stated_bound(store, topk_run, tmp_path):
    out = tmp_path / "ct"
    res = CliRunner().invoke(app, ["export", str(topk_run), str(out), "--store", store, "--calibration-rows", "512",
                                   "--input-hook", MLP_IN])
    assert res.exit_code == 0, res.output
    assert "R² circuit-tracer vs ours" in res.output and "R² circuit-tracer vs targets" in res.output
    summary = json.loads((out / "export_summary.json").read_text())
    agr = summary["agreement"]
    assert summary["exported_as"].startswith("jumprelu") and summary["calibration_rows"] == 512
    assert agr["n_rows"] == 512
    assert agr["summary"]["r2_vs_ours"]["min"] >= TOPK_R2_VS_OURS, agr["summary"]
    # circuit-tracer's reconstruction is nearly as good against the stored targets as ours, with ~k active
    vs_t, ours_t = agr["per_layer"]["r2_vs_targets"], agr["per_layer"]["r2_ours_vs_targets"]
    assert all(a >= b - 0.1 for a, b in zip(vs_t, ours_t)), (vs_t, ours_t)
    assert all(abs(a - 4) < 1.0 for a in agr["per_layer"]["l0_circuit_tracer"])
    if HAVE_CT:
        assert summary["reader"].startswith("circuit-tracer")
    hub = (out / HUB_CONFIG).read_text()
    cfg = json.loads(hub.split("\n", 1)[1])
    assert cfg["model_kind"] == "cross_layer_transcoder" and cfg["feature_output_hook"] == "hook_mlp_out"


@pytest.mark.skipif(not HAVE_CT, reason=CT_WHY)
@pytest.mark.parametrize("sparsifier", ["jumprelu", "batchtopk", "relu_topk"])
def test_circuit_tracer_round_trip(store, tmp_path, sparsifier, monkeypatch):
    """Load the export through circuit-tracer's public loaders and compare its outputs with ours numerically."""
    import yaml
    from circuit_tracer.utils import hf_utils

    from clt_pipe.clt.export import load_clt
    from clt_pipe.clt.rundir import load_fitted

    run = _fit(store, tmp_path / "run", sparsifier)
    out = tmp_path / "ct"
    export_for_circuit_tracer(run, out, store, calibration_rows=256, input_hook=MLP_IN, calibration="frequency")
    exported = load_clt(out)  # what we wrote, as this package reads it
    trained, _ = load_fitted(run)
    x = torch.randn(64, L, D)
    with torch.no_grad():
        want = exported(x).recon
        ct = ct_load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
        got = ct(x.transpose(0, 1).contiguous()).transpose(0, 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        if sparsifier != "relu_topk":  # exact sparsifiers: what circuit-tracer reads is the trained CLT itself
            torch.testing.assert_close(got, trained(x).recon, atol=1e-5, rtol=1e-4)
        # the hub loader path: config.yaml parsed by circuit-tracer's YAML reader, files "downloaded" from out
        config = yaml.safe_load((out / HUB_CONFIG).read_text())
        config.update(repo_id="local/clt", revision=None, subfolder=None, scan="local/clt")
        monkeypatch.setattr(hf_utils, "snapshot_download", lambda *a, **k: str(out))
        hub = hf_utils.load_transcoders(config, torch.device("cpu"), torch.float32, lazy_decoder=False)
        torch.testing.assert_close(hub(x.transpose(0, 1).contiguous()).transpose(0, 1), want, atol=1e-5, rtol=1e-4)
        assert hub.feature_input_hook == MLP_IN


# ---- what the export says it loses ----------------------------------------------------------------------

class _LoudCls:
    """CrossLayerData whose CLS rows (position 0 of every image) are scaled up, as a ViT's CLS stands apart from
    its patches: thresholds matched to TopK's pooled firing rate let many more features through on CLS."""

    def __init__(self, scale: float = 3.0):
        self.base, self.scale = CrossLayerData(T, L, D, seed=1), scale

    def __call__(self, first_image: int, n_images: int):
        x, y = self.base(first_image, n_images)
        x[::T] *= self.scale
        y[::T] *= self.scale
        return x, y


@pytest.fixture(scope="module")
def loud_cls_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loud")
    url = str(root / "s.zarr")
    write_store(url, 256, T, L, D, _LoudCls(), chunk_mb=1 / 16)
    return url, _fit(url, root / "run", "relu_topk")


def test_fake_reader_agreement_is_split_by_token_type():
    """A reader that is exact on patches and noisy on CLS: the pooled R² hides it, the CLS block does not."""
    from clt_pipe.analyze.ct_agreement import agreement, shortfall

    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTSpec(L, D, 64, "relu_topk", 4)).eval()
    x = torch.randn(16 * T, L, D)
    pos = torch.arange(x.shape[0]).remainder(T).numpy()
    cls = torch.as_tensor(pos == 0)

    def read(xb):
        out = clt(xb)
        noise = torch.randn_like(out.recon) * out.recon.std() * cls[: xb.shape[0], None, None]
        return out.recon + noise, (out.z != 0).float().sum(-1) + 10 * cls[: xb.shape[0], None]

    agr = agreement(clt, read, x, x, pos, batch=10_000)
    by = agr["by_token_type"]
    assert by["cls"]["n_rows"] == 16 and by["patches"]["n_rows"] == 16 * (T - 1) and by["all"]["n_rows"] == 16 * T
    assert all(r > 1 - 1e-9 for r in by["patches"]["per_layer"]["r2_vs_ours"])
    assert all(r < 0.5 for r in by["cls"]["per_layer"]["r2_vs_ours"])
    assert min(agr["per_layer"]["r2_vs_ours"]) > max(by["cls"]["per_layer"]["r2_vs_ours"])
    l0 = by["cls"]["per_layer"]
    assert all(abs(a - b - 10) < 1e-6 for a, b in zip(l0["l0_circuit_tracer"], l0["l0_ours"]))
    low = shortfall(agr, 0.9)
    assert low["type"] == "cls" and low["r2"] == min(by["cls"]["per_layer"]["r2_vs_ours"])
    assert shortfall(agr, -1e9) is None


def test_error_calibration_serves_cls_better_than_frequency(loud_cls_run, tmp_path):
    url, run = loud_cls_run
    got = {}
    for method in ("frequency", "error"):
        s = export_for_circuit_tracer(run, tmp_path / method, url, calibration_rows=512, calibration=method,
                                      input_hook=MLP_IN)
        got[method] = s
    freq, err = got["frequency"], got["error"]
    assert err["calibration"]["chosen"] == "error"
    assert err["calibration"]["loss"]["error"] < err["calibration"]["loss"]["frequency"]
    cls_r2 = {m: min(s["agreement"]["by_token_type"]["cls"]["per_layer"]["r2_vs_ours"]) for m, s in got.items()}
    assert cls_r2["error"] > cls_r2["frequency"] + 0.05, cls_r2
    # the shared thresholds fall short on some type; that type's thresholds alone do better there (measured why)
    bound, low = err["type_alone_bound"], err["warning"]
    shared = err["agreement"]["by_token_type"][bound["type"]]["per_layer"]["r2_vs_ours"][bound["layer"]]
    assert bound["type"] + " tokens" in low and bound[f"r2_{bound['type']}"] > shared, (bound, shared)
    # with frequency matching CLS over-fires: more active features than TopK's k on CLS rows
    cls_l0 = freq["agreement"]["by_token_type"]["cls"]["per_layer"]
    assert max(a - b for a, b in zip(cls_l0["l0_circuit_tracer"], cls_l0["l0_ours"])) > 1.0, cls_l0


def test_export_warns_in_one_line_below_min_r2(topk_run, store, tmp_path):
    args = ["export", str(topk_run), str(tmp_path / "a"), "--store", store, "--calibration-rows", "256",
            "--calibration", "frequency", "--input-hook", MLP_IN]
    res = CliRunner().invoke(app, args + ["--min-r2", "1.0"])
    assert res.exit_code == 0, res.output
    warn = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "below --min-r2 1" in warn[0] and "alone reach" in warn[0], res.output
    summary = json.loads((tmp_path / "a" / "export_summary.json").read_text())
    assert summary["warning"] == warn[0].removeprefix("warning: ")
    for t in ("cls", "patches"):
        assert f" {t} (" in res.output
    res = CliRunner().invoke(app, args + ["--min-r2", "-1000"])
    assert res.exit_code == 0 and "warning:" not in res.output, res.output


def test_run_dir_clt_claims_only_the_layout_it_has(store, topk_run, tmp_path):
    """A TopK run's clt/ is not circuit-tracer's layout and circuit-tracer's loader refuses it; a JumpReLU run's
    clt/ is, and circuit-tracer reads it as the same CLT."""
    from clt_pipe.clt.export import load_clt

    meta = json.loads((topk_run / "clt" / "clt.json").read_text())
    assert meta["layout"] == "clt_pipe" and meta["version"] == 2
    jr = _fit(store, tmp_path / "jr", "jumprelu")
    assert json.loads((jr / "clt" / "clt.json").read_text())["layout"] == "circuit-tracer"
    if not HAVE_CT:
        pytest.skip(CT_WHY)
    with pytest.raises(Exception, match="W_enc_0"):
        ct_load_clt(str(topk_run / "clt"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    x = torch.randn(32, L, D)
    with torch.no_grad():
        ct = ct_load_clt(str(jr / "clt"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
        got = ct(x.transpose(0, 1).contiguous()).transpose(0, 1)
        torch.testing.assert_close(got, load_clt(jr / "clt")(x).recon, atol=1e-5, rtol=1e-4)


def _transformer_lens_layer_norm():
    """TransformerLens' LayerNorm class, or a skip saying why. datasets 2.14 (what transformer-lens' pins resolve
    to beside s3fs's fsspec here) subclasses pyarrow's PyExtensionType, which pyarrow 21 removed; the alias lets
    transformer-lens import (its LayerNorm never touches datasets) and is removed again."""
    import pyarrow as pa

    added = not hasattr(pa, "PyExtensionType")
    if added:
        pa.PyExtensionType = pa.ExtensionType
    try:
        from transformer_lens.components import LayerNorm
    except Exception as e:  # noqa: BLE001 - any import failure means: skip, and say why
        pytest.skip(f"transformer-lens is not importable ({type(e).__name__}: {e})")
    finally:
        if added:
            del pa.PyExtensionType
    return LayerNorm


def test_transformer_lens_ln2_hook_normalized_is_before_the_affine_and_the_fold_matches():
    """The export folds LN2's weight and bias into the encoder for ``ln2.hook_normalized``: right only where that
    hook is before the affine, as in the installed transformer-lens. A real TransformerLens LayerNorm is hooked;
    the folded CLT on the hooked value equals the CLT on the LayerNorm's output."""
    from importlib.metadata import version

    from clt_pipe.clt.export import fold_input_affine

    LayerNorm = _transformer_lens_layer_norm()
    torch.manual_seed(0)
    ln = LayerNorm({"d_model": D, "eps": 1e-5, "dtype": torch.float32, "n_layers": 1, "n_ctx": T, "d_head": 8,
                    "act_fn": "gelu"})
    with torch.no_grad():
        ln.w.copy_(torch.rand(D) + 0.5)
        ln.b.copy_(torch.randn(D))
    seen = []
    ln.hook_normalized.add_hook(lambda t, hook: seen.append(t.detach().clone()))
    r = torch.randn(5, L, D) * 3 + 1
    with torch.no_grad():
        out = ln(r)
    (hooked,) = seen
    plain = torch.nn.functional.layer_norm(r, (D,), eps=1e-5)
    tl = version("transformer-lens")
    torch.testing.assert_close(hooked, plain, msg=lambda m: f"transformer-lens {tl}: hook_normalized is not the "
                               f"normalised input before LN's weight and bias; the export's fold is wrong: {m}")
    torch.testing.assert_close(out, hooked * ln.w + ln.b)
    clt = CrossLayerTranscoder(CLTSpec(L, D, 64, "jumprelu", 4)).eval()
    with torch.no_grad():
        clt.log_threshold.fill_(-3.0)
        folded = fold_input_affine(clt, ln.w.detach().expand(L, D), ln.b.detach().expand(L, D))
        want, got = clt(out).recon, folded(hooked).recon
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (clt(out).z != 0).sum() > 0  # the comparison is not between two empty codes


@pytest.fixture(scope="module")
def tiny_clip_env(tmp_path_factory):
    """A tiny open_clip ViT whose ln_2 weights and biases are far from (1, 0), a small store harvested from it and
    a random relu_topk CLT fitted to nothing: what the LN2 fold is checked on."""
    from clt_pipe.backbone.loading import load_backbone
    from clt_pipe.config import HarvestConfig
    from clt_pipe.harvest.run import run_harvest
    from clt_pipe.store.reader import ActivationStore
    from clt_pipe.testing.fakedata import make_fake_imagefolder
    from tests.conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("tinyln")
    make_fake_imagefolder(root / "data", classes=("cat", "dog"), per_class=4, size=32)
    bb = load_backbone(str(TINY_MODEL), "none", "cpu")
    torch.manual_seed(5)
    with torch.no_grad():
        for blk in bb.blocks:
            blk.ln_2.weight.copy_(torch.rand_like(blk.ln_2.weight) * 1.5 + 0.25)
            blk.ln_2.bias.copy_(torch.randn_like(blk.ln_2.bias))
    ckpt = root / "tiny.pt"
    torch.save(bb.model.state_dict(), ckpt)
    url = str(root / "store.zarr")
    run_harvest(build(HarvestConfig, {"model": str(TINY_MODEL), "pretrained": str(ckpt), "dataset": "imagefolder",
                                      "data_root": str(root / "data"), "split": "train", "store": url,
                                      "tokens": "all", "chunk_mb": 0.02, "batch_size": 8,
                                      "template_sets": ["single"], "device": "cpu", "data_workers": 1}),
                log=lambda *a: None)
    st = ActivationStore(url)
    torch.manual_seed(1)
    run = root / "run"
    save_fitted(run, CrossLayerTranscoder(CLTSpec(st.n_layers, st.d_model, 64, "relu_topk", 8)),
                {"store": {"url": url, "fingerprint": st.meta.fingerprint, "model": st.model,
                           "n_layers": st.n_layers, "d_model": st.d_model}})
    gamma = torch.stack([blk.ln_2.weight.detach() for blk in bb.blocks])
    beta = torch.stack([blk.ln_2.bias.detach() for blk in bb.blocks])
    return run, url, gamma, beta


def test_ln2_hook_export_folds_the_tiny_clips_ln2_affine_exactly(tiny_clip_env, tmp_path):
    """On a real (tiny) open_clip store the default export loads the ViT and folds every ln_2's weight and bias
    into the encoder: read at ``ln2.hook_normalized`` it agrees with the CLT exactly as the unfolded export read
    at the LN2 output does, and its encoder is the unfolded one scaled by γ, its bias shifted by β."""
    from clt_pipe.clt.export import load_clt

    run, url, gamma, beta = tiny_clip_env
    kw = dict(calibration_rows=64, calibration="frequency")
    folded = export_for_circuit_tracer(run, tmp_path / "ln2", url, **kw)
    plain = export_for_circuit_tracer(run, tmp_path / "mlp_in", url, input_hook=MLP_IN, **kw)
    assert folded["input_hook"] == "ln2.hook_normalized"
    for key in ("r2_vs_ours", "l0_circuit_tracer"):
        for t in ("cls", "patches"):
            a = folded["agreement"]["by_token_type"][t]["per_layer"][key]
            b = plain["agreement"]["by_token_type"][t]["per_layer"][key]
            assert a == pytest.approx(b, abs=1e-4), (key, t)
    f, p = load_clt(tmp_path / "ln2"), load_clt(tmp_path / "mlp_in")
    torch.testing.assert_close(f.W_enc, p.W_enc * gamma[..., None])
    torch.testing.assert_close(f.b_enc, p.b_enc + torch.einsum("ld,ldf->lf", beta, p.W_enc), atol=1e-4, rtol=1e-4)
    assert (f.b_enc - p.b_enc).abs().max() > 0.1  # β is far from 0: the fold did something
    cfg = json.loads((tmp_path / "ln2" / HUB_CONFIG).read_text().split("\n", 1)[1])
    assert cfg["feature_input_hook"] == "ln2.hook_normalized" and cfg["clt_pipe"]["ln2_affine"].startswith("folded")


@pytest.mark.parametrize("opt,value", [("--calibration", "median"), ("--input-hook", "ln1.hook_normalized")])
def test_bad_export_options_are_refused_in_one_line(topk_run, store, tmp_path, opt, value):
    proc = subprocess.run([sys.executable, "-m", "clt_pipe", "export", str(topk_run), str(tmp_path / "out"),
                           "--store", store, opt, value], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 2 and value in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()
