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


def test_torchrun_sweep_members_match_their_single_fits(tmp_path, warm_cli):
    """Two ranks, a sweep of two sparsifiers: each member equals the same two-rank fit of it alone."""
    from safetensors.torch import load_file

    from clt_pipe.clt.sweepdir import read_sweep

    store = str(tmp_path / "s.zarr")
    write_store(store, 256, T, L, D, RandomRows(T, L, D, seed=4), chunk_mb=1 / 64)
    common = ["--store", store, "--n-features", "32", "--k", "4", "--steps", "8", "--batch-size", "32",
              "--checkpoint-every", "4", "--log-every", "2", "--shuffle-chunks", "2", "--device", "cpu"]
    root, alone = tmp_path / "sweep", tmp_path / "alone"
    assert warmcli.torchrun(2, ["fit", *common, "--out", str(root), "--sweep", "sparsifier=relu_topk,abs_topk"],
                            tmp_path / "logs") == {0: 0, 1: 0}
    assert warmcli.torchrun(2, ["fit", *common, "--out", str(alone), "--sparsifier", "abs_topk"],
                            tmp_path / "logs1") == {0: 0, 1: 0}
    assert [m["name"] for m in read_sweep(root)["members"]] == ["relu_topk", "abs_topk"]
    for name in ("relu_topk", "abs_topk"):
        _, meta = load_fitted(root / name)
        assert meta["world_size"] == 2 and meta["finished"]
        _, state = ckpt.load_latest(root / name, "cpu")
        assert len(state["loader"]) == 2
        lines = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [2, 4, 6, 8]
    a = load_file(str(ckpt.list_checkpoints(root / "abs_topk")[-1] / "model.safetensors"))
    b = load_file(str(ckpt.list_checkpoints(alone)[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
