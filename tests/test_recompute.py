"""``--targets recompute`` (store format v2): mlp_in and the MLP weights are stored, mlp_out is recomputed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
import zarr
from clt_pipe.testing.fakedata import make_fake_imagefolder
from scipy.special import erf

from clt_pipe.analyze.run import run_analyze
from clt_pipe.config import AnalyzeConfig, FitConfig, HarvestConfig, build
from clt_pipe.errors import ConfigError, StoreError
from clt_pipe.fit.trainer import run_fit
from clt_pipe.harvest.run import run_harvest
from clt_pipe.store.identity import seal_record
from clt_pipe.store.inspect import store_info, verify_store
from clt_pipe.store.loader import ChunkLoader
from clt_pipe.store.reader import ActivationStore

TINY = Path(__file__).resolve().parents[1] / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"


def _quiet(*_a, **_k) -> None:
    pass


def rel_rms(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per layer ([rows, L, d] inputs): RMS of the difference / RMS of ``want``."""
    return np.sqrt(((got - want) ** 2).mean(axis=(0, 2)) / (want ** 2).mean(axis=(0, 2)))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("recompute")
    folder = make_fake_imagefolder(root / "imgs", classes=("cat", "dog", "frog"), per_class=6)
    base = dict(model=str(TINY), pretrained="none", dataset="imagefolder", data_root=str(folder["root"]),
                chunk_mb=0.02, chunks_per_shard=2, batch_size=4, template_sets=["single"], tokens="all")
    out = {"root": root, "data": folder["root"]}
    for targets in ("stored", "recompute"):
        url = str(root / f"{targets}.zarr")
        run_harvest(build(HarvestConfig, base, {"store": url, "targets": targets}), log=_quiet)
        out[targets] = url
    return out


def all_rows(store: ActivationStore, name: str) -> np.ndarray:
    return store.decode(store.group[name][:])


def test_recompute_store_keeps_inputs_and_weights_not_outputs(stores):
    stored, rec = ActivationStore(stores["stored"]), ActivationStore(stores["recompute"])
    g = zarr.open_group(stores["recompute"], mode="r")
    assert g.attrs["clt_pipe_store"]["format_version"] == 2 and stored.meta.format_version == 1
    assert "mlp_out" not in g and "mlp_out" in zarr.open_group(stores["stored"], mode="r")
    assert g["mlp_weights/fc_weight"].shape == (6, 256, 64) and g["mlp_weights/proj_bias"].shape == (6, 64)
    # Same forward, same inputs, same statistics (taken from the model's own outputs in both modes).
    assert g["mlp_in"][:].tobytes() == stored.group["mlp_in"][:].tobytes()
    np.testing.assert_array_equal(g["embedding"][:], stored.group["embedding"][:])
    np.testing.assert_array_equal(g["stats/var_out"][:], stored.group["stats/var_out"][:])
    info = store_info(stores["recompute"])
    assert info["targets"].startswith("recomputed") and "GB uncompressed (mlp_in)" in info
    lay = rec.layout
    assert info["GB uncompressed (mlp_in)"] == round(lay.n_tokens * lay.n_layers * lay.d_model * 2 / 1e9, 4)
    assert store_info(stores["stored"])["GB uncompressed (mlp_in+mlp_out)"] == round(
        2 * lay.n_tokens * lay.n_layers * lay.d_model * 2 / 1e9, 4)
    report = verify_store(stores["recompute"])
    assert report["problems"] == [] and report["checked_shards"] == lay.n_shards > 1


def test_recomputed_targets_match_the_model_and_the_format_spec(stores):
    rec, stored = ActivationStore(stores["recompute"]), ActivationStore(stores["stored"])
    x = all_rows(rec, "mlp_in")
    got = rec.targets_on("cpu")(torch.from_numpy(x)).numpy()
    want = all_rows(stored, "mlp_out")
    assert (rel_rms(got, want) < 1e-2).all()  # only the fp16 rounding of the inputs separates them
    assert not np.array_equal(got, want)
    # storage/FORMAT.md's recipe with numpy alone: mlp_out[l] = c_proj(gelu(c_fc(mlp_in[l])))
    g = zarr.open_group(stores["recompute"], mode="r")
    assert g.attrs["clt_pipe_store"]["activations"]["mlp_activation"] == "gelu"
    w = {k: g[f"mlp_weights/{k}"][:].astype(np.float64) for k in ("fc_weight", "fc_bias", "proj_weight", "proj_bias")}
    x64 = x.astype(np.float64)
    for layer in range(x.shape[1]):
        h = x64[:, layer] @ w["fc_weight"][layer].T + w["fc_bias"][layer]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        np.testing.assert_allclose(got[:, layer], h @ w["proj_weight"][layer].T + w["proj_bias"][layer],
                                   rtol=1e-4, atol=1e-5)


def test_loader_batches_carry_recomputed_targets(stores):
    rec, stored = ActivationStore(stores["recompute"]), ActivationStore(stores["stored"])
    a = ChunkLoader(rec, 64, seed=4, shuffle_chunks=3, read_threads=2)
    b = ChunkLoader(stored, 64, seed=4, shuffle_chunks=3, read_threads=2)
    for (ba, bb) in zip(*(iter(a), iter(b))):
        assert torch.equal(ba.x, bb.x) and np.array_equal(ba.image, bb.image)
        assert ba.y.dtype == torch.float32 and (rel_rms(ba.y.numpy(), bb.y.numpy()) < 1e-2).all()
        if a.state_dict()["epoch"] > 0:
            break
    a.close()
    b.close()


def test_kept_rows_of_a_recompute_store_are_its_inputs_only(stores):
    """Kept rows hold mlp_in alone (half the bytes): the targets of later epochs are recomputed from them, and
    every batch is the one of decoding the store again."""
    rec = ActivationStore(stores["recompute"])
    on = ChunkLoader(rec, 64, seed=4, shuffle_chunks=3, read_threads=2)
    off = ChunkLoader(rec, 64, seed=4, shuffle_chunks=3, read_threads=2, keep_rows=False)
    lay = rec.layout
    assert on.keep_plan.need_bytes == on.rows_per_epoch * lay.n_layers * lay.d_model * 2
    tiers = set()
    for ba, bb in zip(iter(on), iter(off)):
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.y, bb.y) and np.array_equal(ba.image, bb.image)
        tiers.add((on.epoch, ba.tier))
        if on.epoch > 2:
            break
    on.close()
    off.close()
    assert on._kept.y is None and {t for e, t in tiers if e in (1, 2)} == {"memory host"}


def test_fit_and_analyze_on_a_recompute_store(stores, tmp_path):
    r2 = {}
    for targets in ("stored", "recompute"):
        out = tmp_path / targets
        fit = build(FitConfig, dict(store=stores[targets], out=str(out / "clt"), k=8, expansion=4, steps=100,
                                    batch_size=128, warmup_steps=5, shuffle_chunks=4, checkpoint_every=100,
                                    log_every=50, device="cpu", seed=0, lr=3e-3))
        run_fit(fit)
        cfg = build(AnalyzeConfig, dict(store=stores[targets], clt=str(out / "clt"), out=str(out / "report"),
                                        only=["fidelity"], device="cpu", read_threads=2))
        run_analyze(cfg)
        rep = json.loads((out / "report" / "report.json").read_text())
        r2[targets] = [r["r2"] for r in rep["results"]["fidelity"]["per_layer"] if r["tokens"] == "all"]
    assert len(r2["recompute"]) == 6 and min(r2["recompute"]) > 0.5  # it learned something
    np.testing.assert_allclose(r2["recompute"], r2["stored"], atol=0.01)


def test_verify_catches_weights_that_do_not_belong(stores, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(stores["recompute"], bad)
    g = zarr.open_group(str(bad), mode="r+")
    g["mlp_weights/fc_bias"][:] = g["mlp_weights/fc_bias"][:] + 1.0
    report = verify_store(str(bad))  # the checksum of the weights catches it first
    assert report["bad_shards"] == [-1] and "fc_bias: missing or damaged" in report["problems"][0][1]
    # Intact (checksummed) weights of another model: the stored samples catch that.
    new_crc = crc32c.crc32c(np.ascontiguousarray(g["mlp_weights/fc_bias"][:]).data)
    g["mlp_weights"].attrs["crc32c"] = {**g["mlp_weights"].attrs["crc32c"], "fc_bias": new_crc}
    # as if the wrong weights had been written from the start (finalisation checksums them into COMPLETE.json)
    done = json.loads((bad / "COMPLETE.json").read_text())
    done["checksums"]["arrays"]["mlp_weights/fc_bias"] = new_crc
    (bad / "COMPLETE.json").write_text(json.dumps(seal_record(done)))
    report = verify_store(str(bad))
    assert sorted(report["bad_shards"]) == list(range(ActivationStore(str(bad)).layout.n_shards))
    assert all("MLP weights do not match" in p for _, p in report["problems"])


def test_lost_weight_file_is_an_error_not_zeros(stores, tmp_path):
    bad = tmp_path / "lost.zarr"
    shutil.copytree(stores["recompute"], bad)
    (bad / "mlp_weights" / "proj_weight" / "c" / "0" / "0" / "0").unlink()  # one chunk per weight array
    store = ActivationStore(str(bad))
    with pytest.raises(StoreError, match="proj_weight: missing or damaged"):
        ChunkLoader(store, 64, seed=0)


def test_recompute_refuses_an_mlp_it_cannot_rebuild():
    from clt_pipe.backbone.mlp import mlp_activation, mlp_weights

    block = torch.nn.Module()
    block.mlp = torch.nn.Sequential()
    block.mlp.add_module("c_fc", torch.nn.Linear(4, 8))
    block.mlp.add_module("gelu", torch.nn.SiLU())
    block.mlp.add_module("c_proj", torch.nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="SiLU"):
        mlp_weights([block])
    with pytest.raises(ConfigError, match="SiLU"):
        mlp_activation([block])
