"""A store on S3: s3fs against a local S3 server (moto, on 127.0.0.1 only), the path a teammate shares."""

from __future__ import annotations

import numpy as np
import pytest
from clt_pipe.testing.fakedata import make_fake_imagefolder

from clt_pipe.config import HarvestConfig, build
from clt_pipe.harvest.run import run_harvest
from clt_pipe.store.inspect import verify_store
from clt_pipe.store.loader import ChunkLoader
from clt_pipe.store.reader import ActivationStore
from tests.conftest import moto_s3


@pytest.fixture(scope="module")
def s3():
    with moto_s3("team-bucket"):
        yield "s3://team-bucket"


def test_harvest_to_s3_then_verify_and_stream(s3, tmp_path, tiny_model_config):
    # 8 images, 2 per chunk and shard: 4 shards, ~75 objects (each costs moto ~20 ms)
    data = make_fake_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=4)["root"]
    common = dict(model=str(tiny_model_config), pretrained="none", dataset="imagefolder", data_root=str(data),
                  chunk_mb=0.02, chunks_per_shard=1, batch_size=4, template_sets=["single"], device="cpu")
    url = f"{s3}/stores/tiny.zarr"
    run_harvest(build(HarvestConfig, dict(common, store=url)))
    run_harvest(build(HarvestConfig, dict(common, store=str(tmp_path / "local.zarr"))))
    remote, local = ActivationStore(url), ActivationStore(str(tmp_path / "local.zarr"))
    assert remote.is_complete and remote.layout.n_shards > 1
    assert remote.committed_shards() == local.committed_shards()
    for name in ("mlp_in", "mlp_out", "resid_final"):
        assert np.array_equal(remote.array(name)[:], local.array(name)[:], equal_nan=True), name
    assert remote.images().equals(local.images())
    report = verify_store(url)
    assert report["complete"] and not report["bad_shards"] and report["checked_chunks"] == remote.layout.n_chunks
    loader = ChunkLoader(remote, 32, seed=0, shuffle_chunks=2, read_threads=2)
    batch = next(iter(loader))
    loader.close()
    assert batch.x.shape == (32, remote.n_layers, remote.d_model) and np.isfinite(batch.x.numpy()).all()
