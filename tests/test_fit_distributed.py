"""Data-parallel fit under torchrun's launcher (gloo on CPU): two ranks, disjoint windows, averaged gradients."""

from __future__ import annotations

import json

import torch
from clt_pipe.testing.synthstore import RandomRows, write_store

from clt_pipe.fit import checkpoint as ckpt
from clt_pipe.clt.rundir import load_fitted
from clt_pipe.store.loader import ChunkLoader
from clt_pipe.store.reader import ActivationStore
from tests import warmcli

L, D, T = 3, 16, 8


def test_torchrun_two_ranks(tmp_path, warm_cli):
    store = str(tmp_path / "s.zarr")
    write_store(store, 256, T, L, D, RandomRows(T, L, D, seed=3), chunk_mb=1 / 64)
    out = tmp_path / "run"
    results = warmcli.torchrun(2, ["fit", "--store", store, "--out", str(out), "--n-features", "32", "--k", "4",
                                   "--steps", "12", "--batch-size", "32", "--checkpoint-every", "6",
                                   "--log-every", "3", "--shuffle-chunks", "2", "--device", "cpu"],
                               tmp_path / "logs")
    assert results == {0: 0, 1: 0}
    model, meta = load_fitted(out)
    assert meta["world_size"] == 2 and meta["finished"]
    # The checkpoint holds both ranks' loader positions, and they read different windows.
    weights, state = ckpt.load_latest(out, "cpu")
    assert len(state["loader"]) == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6, 9, 12]  # one writer: rank 0
    s = ActivationStore(store)
    a = ChunkLoader(s, 32, shuffle_chunks=2, rank=0, world_size=2)
    b = ChunkLoader(s, 32, shuffle_chunks=2, rank=1, world_size=2)
    wa = {int(c) for w in a._windows(0) for c in w}
    wb = {int(c) for w in b._windows(0) for c in w}
    assert wa and wb and not wa & wb
    a.close()
    b.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())
