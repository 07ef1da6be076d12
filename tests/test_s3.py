"""A store on S3: s3fs against a local S3 server (moto, on 127.0.0.1 only), the path a teammate shares.

Requests are counted as the client sends them (clt_pipe/testing/s3requests.py): an object store charges a round
trip for each, so a harvest should cost about one request per object it writes, and fit and analyze one per
chunk they read, plus a constant."""

from __future__ import annotations

import re

import numpy as np
import pytest
from clt_pipe.testing.fakedata import make_fake_imagefolder

from clt_pipe.config import FitConfig, HarvestConfig, build
from clt_pipe.harvest.run import run_harvest
from clt_pipe.store.inspect import verify_store
from clt_pipe.store.loader import ChunkLoader
from clt_pipe.store.reader import ActivationStore
from clt_pipe.testing.s3requests import count_s3_requests
from tests.conftest import TINY_MODEL, analyze_config, moto_s3

BUCKET = "team-bucket"
CHUNK = re.compile(r"/c(/\d+)+$")  # a chunk object's key (zarr v3 default encoding)
CONSTANT = 30  # requests a stage may make besides one per object written or chunk read


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as fs:
        yield fs


@pytest.fixture(scope="module")
def harvested(s3, tmp_path_factory):
    """8 images, 2 per chunk and shard (4 shards, ~75 objects; each costs moto ~20 ms) harvested to S3 with its
    requests counted, and the same harvest to a local folder."""
    tmp = tmp_path_factory.mktemp("s3")
    data = make_fake_imagefolder(tmp / "data", classes=("a", "b"), per_class=4)["root"]
    common = dict(model=str(TINY_MODEL), pretrained="none", dataset="imagefolder", data_root=str(data),
                  chunk_mb=0.02, chunks_per_shard=1, batch_size=4, template_sets=["single"], device="cpu")
    url = f"s3://{BUCKET}/stores/tiny.zarr"
    with count_s3_requests() as log:
        run_harvest(build(HarvestConfig, dict(common, store=url)))
    run_harvest(build(HarvestConfig, dict(common, store=str(tmp / "local.zarr"))))
    objects = s3.find(f"{BUCKET}/stores/tiny.zarr")
    return {"url": url, "local": str(tmp / "local.zarr"), "log": log, "objects": objects, "data": data, "tmp": tmp}


def test_harvest_to_s3_then_verify_and_stream(harvested):
    url = harvested["url"]
    remote, local = ActivationStore(url), ActivationStore(harvested["local"])
    assert remote.is_complete and remote.layout.n_shards > 1
    assert remote.committed_shards() == local.committed_shards()
    for name in ("mlp_in", "mlp_out", "resid_final"):
        assert np.array_equal(remote.array(name)[:], local.array(name)[:], equal_nan=True), name
    assert remote.images().equals(local.images())
    assert remote.complete_record["checksums"] == local.complete_record["checksums"]
    report = verify_store(url)
    assert report["complete"] and not report["bad_shards"] and report["checked_chunks"] == remote.layout.n_chunks
    loader = ChunkLoader(remote, 32, seed=0, shuffle_chunks=2, read_threads=2)
    batch = next(iter(loader))
    loader.close()
    assert batch.x.shape == (32, remote.n_layers, remote.d_model) and np.isfinite(batch.x.numpy()).all()


def test_harvest_requests_are_about_one_per_object_written(harvested):
    log, objects = harvested["log"], harvested["objects"]
    assert len(objects) > 60
    assert len(log) <= len(objects) + CONSTANT, (log.summary(), len(objects))
    # Nothing is read back: no object fetched twice, no existence check before each read (the harvest lock is
    # read back after its conditional write and before its removal: its protocol, storage/FORMAT.md).
    assert not {p for p in log.repeated("GET") if not p.endswith("/harvest.lock")}, log.requests
    assert not log.repeated("HEAD"), log.requests
    assert len(log.reads()) <= 12, log.reads()


def _key(path: str) -> str:
    return path.split("/tiny.zarr/", 1)[-1]


def _check_reads(log, activation_reads: int | None = None) -> None:
    """Every chunk a GET of its own (no HEAD, no second fetch except of activation chunks, which a stage may
    stream more than once); everything else within CONSTANT requests, each object once."""
    chunk_reqs = [(m, _key(p)) for m, p in log.requests if CHUNK.search(p)]
    assert {m for m, _ in chunk_reqs} <= {"GET"}, chunk_reqs
    repeated = {p: n for p, n in log.repeated("GET").items() if not _key(p).startswith(("mlp_in/c/", "mlp_out/c/"))}
    assert not repeated, repeated
    others = [(m, _key(p)) for m, p in log.requests if not CHUNK.search(p)]
    assert len(others) <= CONSTANT, others
    if activation_reads is not None:
        act = [k for _, k in chunk_reqs if k.startswith(("mlp_in/c/", "mlp_out/c/"))]
        assert len(act) == activation_reads, (len(act), activation_reads)


@pytest.fixture(scope="module")
def s3_fit(harvested):
    """A short fit streaming from the S3 store, its requests counted and the chunks its loader read tallied."""
    from clt_pipe.fit.trainer import run_fit

    tally = []
    original = ActivationStore.read_chunks_into

    def counted(self, pieces, check=None):
        tally.append(len(pieces))
        return original(self, pieces, check)

    mp = pytest.MonkeyPatch()
    mp.setattr(ActivationStore, "read_chunks_into", counted)
    out = harvested["tmp"] / "run"
    try:
        with count_s3_requests() as log:
            run_fit(build(FitConfig, dict(store=harvested["url"], out=str(out), n_features=32, k=4, steps=12,
                                          batch_size=32, log_every=1, checkpoint_every=1000, device="cpu", seed=3,
                                          read_threads=2)))
    finally:
        mp.undo()
    return {"run": out, "log": log, "chunks_read": sum(tally)}


def test_fit_reads_one_request_per_chunk_plus_a_constant(s3_fit):
    log = s3_fit["log"]
    assert s3_fit["chunks_read"] >= 4  # more than one window: the counting sees the streaming
    _check_reads(log, activation_reads=2 * s3_fit["chunks_read"])  # mlp_in and mlp_out


def test_analyze_reads_one_request_per_chunk_plus_a_constant(harvested, s3_fit):
    from clt_pipe.analyze.run import run_analyze

    env = {"store_url": harvested["url"], "run_dir": s3_fit["run"], "root": harvested["tmp"]}
    cfg = analyze_config(env, data_root=str(harvested["data"]),
                         only=["zeroshot", "fidelity", "attribution", "openloop", "retrieval", "atlas"])
    with count_s3_requests() as log:
        run_analyze(cfg)
    assert any(CHUNK.search(p) for _, p in log.requests)
    _check_reads(log)
