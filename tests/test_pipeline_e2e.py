"""The stages end to end: `clt-pipe run`, multi-writer harvest, object-store URLs, and the demo (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import dask
import numpy as np
import pytest
import zarr
from clt_pipe.testing.fakedata import make_fake_imagefolder

from clt_pipe.config import HarvestConfig, build
from clt_pipe.harvest.run import run_harvest
from clt_pipe.pipeline import run_pipeline
from clt_pipe.store.inspect import verify_store
from clt_pipe.store.reader import ActivationStore

PIPELINE = """
[harvest]
model = "{model}"
pretrained = "none"
dataset = "imagefolder"
data_root = "{data}"
store = "{work}/train.zarr"
chunk_mb = 0.05
chunks_per_shard = 2
batch_size = 8
device = "cpu"
template_sets = ["single"]

[fit]
out = "{work}/clt"
k = 4
expansion = 2
steps = 30
batch_size = 64
checkpoint_every = 10
log_every = 10

[analyze]
out = "{work}/report"
data_root = "{data}"
windows = ["0-5", "3-5"]
window_tokens = ["cls", "all"]
ablation_keep = 2
retrieval_queries = 2
retrieval_k = 3
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_fake_imagefolder(root, classes=("cat", "dog", "bird"), per_class=8)["root"]


def test_run_pipeline_end_to_end_then_skips_finished_stages(tmp_path, data, tiny_model_config):
    toml = tmp_path / "p.toml"
    toml.write_text(PIPELINE.format(model=tiny_model_config, data=data, work=tmp_path))
    first = run_pipeline(toml)
    assert first["harvest"]["n_images"] == 24 and first["fit"]["steps"] == 30
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["results"]["computed"]) >= {"fidelity", "attribution", "closedloop", "ablation"}
    # The CLT the report evaluated is the one fit wrote, on the store harvest wrote.
    run = json.loads((tmp_path / "clt" / "run.json").read_text())
    assert run["store"]["fingerprint"] == ActivationStore(str(tmp_path / "train.zarr")).meta.fingerprint
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "report" / "report.json",
                                                 tmp_path / "clt" / "clt" / "clt.json")}
    second = run_pipeline(toml)
    assert second["harvest"].get("already_complete") is True
    assert second["fit"].get("already_finished") is True
    assert second["analyze"].get("skipped") is True
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def _harvest_cfg(store: str, data, model, **kw) -> HarvestConfig:
    return build(HarvestConfig, dict(model=str(model), pretrained="none", dataset="imagefolder", data_root=str(data),
                                     store=store, chunk_mb=0.05, chunks_per_shard=1, batch_size=4,
                                     template_sets=["single"], device="cpu", **kw))


def test_dask_workers_write_the_same_store_as_one_writer(tmp_path, data, tiny_model_config, warm_cli):
    one = run_harvest(_harvest_cfg(str(tmp_path / "one.zarr"), data, tiny_model_config))
    # The workers are real processes, forked from the warm_cli forkserver rather than spawned (dask's
    # default), which saves each of them the ~5 s torch + open_clip import; what they run is the same.
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        two = run_harvest(_harvest_cfg(str(tmp_path / "two.zarr"), data, tiny_model_config, workers=2))
    assert two["workers"] == 2 and one["n_shards"] == two["n_shards"] > 2
    a, b = zarr.open_group(str(tmp_path / "one.zarr"), mode="r"), zarr.open_group(str(tmp_path / "two.zarr"), mode="r")
    for name in ("mlp_in", "mlp_out", "resid_final", "embedding", "stats/mean_in", "stats/var_out"):
        assert np.array_equal(a[name][:], b[name][:], equal_nan=True), name
    assert not verify_store(str(tmp_path / "two.zarr"))["bad_shards"]


def test_fsspec_url_store_behaves_like_a_path(tmp_path, data, tiny_model_config):
    """memory:// goes through the same fsspec code path as s3:// (FsspecStore + fsspec side files)."""
    url = "memory://clt-pipe-test/store.zarr"
    run_harvest(_harvest_cfg(url, data, tiny_model_config))
    run_harvest(_harvest_cfg(str(tmp_path / "local.zarr"), data, tiny_model_config))
    remote, local = ActivationStore(url), ActivationStore(str(tmp_path / "local.zarr"))
    assert remote.is_complete and remote.committed_shards() == local.committed_shards()
    assert np.array_equal(remote.array("mlp_out")[:], local.array("mlp_out")[:], equal_nan=True)
    assert remote.images().equals(local.images())
    report = verify_store(url)
    assert report["complete"] and not report["bad_shards"] and report["checked_chunks"] > 0


@pytest.mark.slow
def test_demo_runs_offline_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clt_pipe", "demo", "--workdir", str(tmp_path), "--fast"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["headline"]["baseline_top1"] > 80  # the tiny CLIP is far above chance (10 %)
    assert report["headline"]["r2_all"] > 0.5
