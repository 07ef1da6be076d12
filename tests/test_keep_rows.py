"""Rows kept across epochs (store/keep.py): the batches of epochs served from memory are the batches of
decoding the store again, bit for bit, through resume; the budget decides; the fit says which tier served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clt_pipe.config import FitConfig, build
from clt_pipe.fit import checkpoint as ckpt
from clt_pipe.fit.trainer import run_fit
from clt_pipe.store.keep import KEEP_SHARE, plan_keep
from clt_pipe.store.loader import ChunkLoader
from clt_pipe.store.reader import ActivationStore
from clt_pipe.testing.synthstore import RandomRows, write_store

L, D, T = 3, 16, 6


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def store(tmp_path_factory, request) -> ActivationStore:
    """300 images x 6 tokens, 19 chunks (the last partial)."""
    url = str(tmp_path_factory.mktemp("keep") / f"{request.param}.zarr")
    write_store(url, 300, T, L, D, RandomRows(T, L, D, seed=2), dtype=request.param, chunk_mb=1 / 64,
                chunks_per_shard=3)
    return ActivationStore(url)


def batches(loader: ChunkLoader, epochs: int) -> list:
    """Every batch up to the end of epoch ``epochs - 1``, as (epoch, x, y, image, tier)."""
    out, it = [], iter(loader)
    while True:
        b = next(it)
        if loader.epoch >= epochs:
            return out
        out.append((loader.epoch, b.x.clone(), b.y.clone(), b.image.copy(), b.tier))


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want) > 0
    for (eg, xg, yg, ig, _), (ew, xw, yw, iw, _) in zip(got, want):
        assert eg == ew
        assert torch.equal(xg, xw) and torch.equal(yg, yw) and np.array_equal(ig, iw)


@pytest.mark.parametrize("tokens, holdout", [("all", 0.0), ("cls", 0.2)])
def test_kept_epochs_are_the_store_epochs_bit_for_bit(store, tokens, holdout):
    kw = dict(tokens=tokens, holdout=holdout, seed=7, shuffle_chunks=3, read_threads=2)
    B = 16 if tokens == "cls" else 64
    off = ChunkLoader(store, B, keep_rows=False, **kw)
    on = ChunkLoader(store, B, **kw)
    assert off.keep_plan.tier is None and on.keep_plan.tier == "memory host"
    want, got = batches(off, 3), batches(on, 3)
    off.close()
    on.close()
    assert_same(got, want)
    assert {t for e, *_, t in want} == {"store"}
    assert {t for e, *_, t in got if e == 0} == {"store"}
    assert {t for e, *_, t in got if e > 0} == {"memory host"}  # no store read after the first epoch
    # (batches() took the first batch of epoch 3 to see the epoch end)
    assert on.tiers() == "epoch 0 store; epochs 1-3 memory host" and off.tiers() == "epochs 0-3 store"
    assert on._kept.filled == on.rows_per_epoch == len(on._kept.x)  # decoded once, each row in one slot


def test_resume_mid_second_epoch_is_exact_and_refills(store):
    """A resume in epoch 1 starts with nothing kept: it decodes what it needs (a start-up read dropped by the
    resume included) and serves later epochs from memory, with the batches of an uninterrupted run."""
    kw = dict(seed=3, shuffle_chunks=4, read_threads=2)
    straight = ChunkLoader(store, 48, keep_rows=False, **kw)
    full = batches(straight, 4)
    straight.close()
    ref = ChunkLoader(store, 48, **kw)
    it, n = iter(ref), 0
    while not (ref.epoch == 1 and ref.window == 2):
        next(it)
        n += 1
    state = ref.state_dict()
    ref.close()
    want = full[n:]
    resumed = ChunkLoader(store, 48, **kw)
    resumed.prefetch()  # the trainer's start-up read of epoch 0's first window, dropped by the resume
    resumed.load_state_dict(state)
    got = batches(resumed, 4)
    resumed.close()
    assert got[0][0] == 1
    assert_same(got, want)
    tiers = {e: {t for e2, *_, t in got if e2 == e} for e in (1, 2, 3)}
    assert tiers[1] == {"store"}  # the rest of epoch 1: nothing kept yet
    # Epoch 2 decodes the windows holding chunks that epoch 1 read before the resume; epoch 3 is all memory.
    assert tiers[2] <= {"store", "memory host"} and tiers[3] == {"memory host"}
    assert resumed._kept.filled == resumed.rows_per_epoch
    assert resumed.tiers().endswith("epochs 3-4 memory host")  # (and the batch that ended epoch 3)


def test_budget_decides(store):
    need = ChunkLoader(store, 64, keep_rows=False).rows_per_epoch * L * D * 2 * 2
    small = ChunkLoader(store, 64, seed=1, keep_memory=0.5 * need / 2**30)
    assert small.keep_plan.tier is None and "exceed" in small.keep_plan.describe()
    assert {t for *_, t in batches(small, 2)} == {"store"} and small._kept is None
    small.close()
    fits = ChunkLoader(store, 64, seed=1, keep_memory=2 * need / 2**30)
    assert fits.keep_plan.tier == "memory host" and fits.keep_plan.need_bytes == need
    fits.close()
    auto = plan_keep(True, need, 0.0, available=10 * need, device=torch.device("cpu"), shared_by=2)
    assert auto.tier and auto.budget_bytes == int(KEEP_SHARE * 10 * need / 2)
    assert plan_keep(True, need, 0.0, available=3 * need, device=torch.device("cpu"), shared_by=2).tier is None
    assert plan_keep(False, need, 0.0, available=10 * need, device=torch.device("cuda")).describe() \
        == "no: --no-keep-rows"
    assert plan_keep(True, need, 0.0, available=10 * need, device=torch.device("cuda")).tier == "memory device"


def fit_cfg(url: str, out: Path, **kw) -> FitConfig:
    base = dict(store=url, out=str(out), n_features=32, k=4, steps=70, batch_size=64, lr=3e-3, warmup_steps=5,
                log_every=1, checkpoint_every=1000, dead_tokens=500, shuffle_chunks=3, read_threads=2, device="cpu",
                seed=5)
    base.update(kw)
    return build(FitConfig, base)


class Interrupt(KeyboardInterrupt):
    pass


def test_fit_weights_and_summary_with_kept_rows(store, tmp_path):
    """A fit of two and a half epochs with kept rows, one from the store alone and one killed in its second
    epoch and resumed train the same weights; the summary and the metrics say which tier served."""
    url = store.url
    probe = ChunkLoader(store, 64, seed=5, shuffle_chunks=3, keep_rows=False)
    epochs = [e for e, *_ in batches(probe, 3)]
    per_epoch = [epochs.count(i) for i in range(3)]
    probe.close()
    steps, kill = per_epoch[0] + per_epoch[1] + per_epoch[2] // 2, per_epoch[0] + per_epoch[1] // 2
    off = run_fit(fit_cfg(url, tmp_path / "off", steps=steps, keep_rows=False))
    on = run_fit(fit_cfg(url, tmp_path / "on", steps=steps))
    assert off["data_tiers"] == "epochs 0-2 store" and off["kept_rows"] == "no: --no-keep-rows"
    assert on["data_tiers"] == "epoch 0 store; epochs 1-2 memory host"
    assert on["kept_rows"].startswith("memory host (")

    def hook(step: int) -> None:
        if step == kill:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_fit(fit_cfg(url, tmp_path / "resumed", steps=steps, checkpoint_every=kill), on_step=hook)
    resumed = run_fit(fit_cfg(url, tmp_path / "resumed", steps=steps, checkpoint_every=kill, resume=True))
    assert resumed["data_tiers"].startswith("epoch 1 store; epoch 2 ")  # nothing kept at the resume

    from safetensors.torch import load_file
    weights = {k: load_file(str(ckpt.list_checkpoints(tmp_path / k)[-1] / "model.safetensors"))
               for k in ("off", "on", "resumed")}
    for name in ("on", "resumed"):
        assert weights[name].keys() == weights["off"].keys()
        assert all(torch.equal(weights[name][k], weights["off"][k]) for k in weights["off"]), name
    lines = [json.loads(ln) for ln in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_tier"] for r in lines[:per_epoch[0]]] == ["store"] * per_epoch[0]
    assert {r["data_tier"] for r in lines[per_epoch[0]:]} == {"memory host"}


def test_keep_options_from_toml_and_cli(tmp_path):
    from clt_pipe.errors import ConfigError
    from clt_pipe.pipeline import stage_config

    toml = tmp_path / "fit.toml"
    toml.write_text("[fit]\nkeep_rows = false\nkeep_memory = 12.5\n")
    cfg = stage_config(FitConfig, "fit", str(toml), {})
    assert (cfg.keep_rows, cfg.keep_memory) == (False, 12.5)
    cli = stage_config(FitConfig, "fit", str(toml), {"keep_rows": True, "keep_memory": None})
    assert (cli.keep_rows, cli.keep_memory) == (True, 12.5)
    with pytest.raises(ConfigError, match="keep_memory"):
        build(FitConfig, {"keep_memory": -1.0})
