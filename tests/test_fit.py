"""Fit and loader on synthetic stores (clt_pipe/testing/synthstore.py): recovery of a known cross-layer dictionary,
exact resume, export round trip, loader order/coverage/splits, and clean errors on bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.config import FitConfig, build
from clt_pipe.errors import CheckpointError, CltPipeError, ConfigError, StoreError
from clt_pipe.fit import checkpoint as ckpt
from clt_pipe.clt import rundir
from clt_pipe.clt.rundir import load_fitted
from clt_pipe.fit.trainer import Trainer, run_fit
from clt_pipe.store import format as F
from clt_pipe.store.loader import ChunkLoader, split_chunks
from clt_pipe.store.reader import ActivationStore

from clt_pipe.testing.synthstore import CrossLayerData, RandomRows, write_store

L, D, T = 4, 32, 8
TIMING_FIELDS = ("time", "steps_per_s", "tokens_per_s")


class RowIdRows:
    """Rows that say which row they are: x[r, :, 0] = r % 2048, x[r, :, 1] = r // 2048 (exact in fp16)."""

    def __call__(self, first_image: int, n_images: int):
        r = np.arange(first_image * T, (first_image + n_images) * T)
        x = np.zeros((len(r), L, D), np.float32)
        x[:, :, 0] = (r % 2048)[:, None]
        x[:, :, 1] = (r // 2048)[:, None]
        x[:, :, 2:] = np.random.default_rng(first_image).standard_normal((len(r), L, D - 2))
        return x, -x


def row_ids(batch) -> np.ndarray:
    x = batch.x[:, 0].numpy()
    return (x[:, 0] + 2048 * x[:, 1]).astype(np.int64)


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fit")


@pytest.fixture(scope="module")
def xl_store(tmp_module) -> str:
    """1024 images x 8 tokens from a sparse cross-layer dictionary; 32 chunks of 32 images."""
    url = str(tmp_module / "xl.zarr")
    write_store(url, 1024, T, L, D, CrossLayerData(T, L, D, n_true=48, k_true=2, seed=0), chunk_mb=1 / 16)
    return url


@pytest.fixture(scope="module")
def id_store(tmp_module) -> str:
    """600 images x 8 tokens whose rows carry their row index; 19 chunks of 32 images (the last partial)."""
    url = str(tmp_module / "id.zarr")
    write_store(url, 600, T, L, D, RowIdRows(), chunk_mb=1 / 16, chunks_per_shard=3)
    return url


@pytest.fixture(scope="module")
def small_store(tmp_module) -> str:
    url = str(tmp_module / "small.zarr")
    write_store(url, 256, T, L, D, RandomRows(T, L, D, seed=1), chunk_mb=1 / 16)
    return url


def fit_cfg(store: str, out, **kw) -> FitConfig:
    base = dict(store=store, out=str(out), n_features=64, k=4, steps=20, batch_size=64, lr=3e-3, warmup_steps=5,
                log_every=1, checkpoint_every=1000, dead_tokens=2000, shuffle_chunks=3, read_threads=2,
                device="cpu", seed=3)
    base.update(kw)
    return build(FitConfig, base)


def heldout_rows(store_url: str, holdout: float):
    store = ActivationStore(store_url)
    _, held = split_chunks(store.layout.n_chunks, holdout)
    xs, ys = zip(*(store.read_chunk(int(c)) for c in held))
    return torch.from_numpy(np.concatenate(xs)).float(), torch.from_numpy(np.concatenate(ys)).float()


def fvu(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per layer: Σ‖ŷ - y‖² / Σ‖y - ȳ‖² over rows."""
    return ((pred - y) ** 2).sum(-1).mean(0) / ((y - y.mean(0)) ** 2).sum(-1).mean(0)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file's sha256 but the folder's writer lock (not data: each command into the folder takes it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "writer.lock"}


def metrics_lines(out) -> list[dict]:
    lines = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines() if ln]
    return [{k: v for k, v in rec.items() if k not in TIMING_FIELDS} for rec in lines]


def final_weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt.list_checkpoints(out)[-1] / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- recovery ---------------------------------------------------------------------------------------------
HOLDOUT = 0.125
RECOVERY = dict(steps=300, batch_size=256, lr=5e-3, warmup_steps=20, holdout=HOLDOUT, shuffle_chunks=4,
                log_every=50)


def train_per_layer_baseline(cfg: FitConfig) -> CrossLayerTranscoder:
    """The same CLT, loss, optimiser, schedule and batches, but every feature writes only to its own layer
    (off-diagonal decoder blocks zero and kept zero): a stack of per-layer transcoders."""
    trainer = Trainer(cfg, ActivationStore(cfg.store), torch.device("cpu"))

    def clamp():
        with torch.no_grad():
            for w in trainer.model.W_dec:
                w[:, 1:].zero_()

    clamp()
    batches = iter(trainer.loader)
    try:
        while trainer.step < cfg.steps:
            trainer.train_step(next(batches))
            clamp()
    finally:
        trainer.loader.close()
    return trainer.model.eval()


def test_fit_recovers_cross_layer_dictionary(xl_store, tmp_path):
    cfg = fit_cfg(xl_store, tmp_path / "clt", **RECOVERY)
    result = run_fit(cfg)
    assert result["steps"] == cfg.steps
    model, meta = load_fitted(cfg.out)
    assert meta["finished"] and meta["spec"]["n_features"] == 64
    x, y = heldout_rows(xl_store, HOLDOUT)
    base = train_per_layer_baseline(cfg)
    with torch.no_grad():
        clt_fvu = fvu(model(x).recon, y)
        base_fvu = fvu(base(x).recon, y)
    # Layer j of the target mixes codes of layers 0..j with equal weight: a per-layer transcoder can explain
    # at most ~1/(j+1) of it (plus whatever correlation x_j happens to have with earlier codes: none here).
    print("held-out FVU per layer: CLT", clt_fvu.tolist(), "per-layer baseline", base_fvu.tolist())
    assert clt_fvu.max() < 0.12, clt_fvu
    assert base_fvu[0] < 0.2, base_fvu  # layer 0 has no earlier sources: the baseline is a fair competitor
    assert base_fvu[-1] > 0.6, base_fvu
    assert clt_fvu.mean() < 0.3 * base_fvu.mean(), (clt_fvu, base_fvu)


# ---- exact resume -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_run(small_store, tmp_module) -> Path:
    out = tmp_module / "straight"
    run_fit(fit_cfg(small_store, out))
    return out


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_at(step: int):
    def hook(s: int) -> None:
        if s == step:
            raise Interrupt()

    return hook


def test_exact_resume(small_store, straight_run, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_fit(fit_cfg(small_store, out, checkpoint_every=10), on_step=interrupt_at(10))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000010"]
    assert not json.loads((out / rundir.RUN_FILE).read_text())["finished"]
    result = run_fit(fit_cfg(small_store, out, checkpoint_every=10, resume=True))
    assert result["steps"] == 20
    assert_same_weights(final_weights(out), final_weights(straight_run))
    assert metrics_lines(out) == metrics_lines(straight_run)
    assert [r["step"] for r in metrics_lines(out)] == list(range(1, 21))
    a, _ = load_fitted(out)
    b, _ = load_fitted(straight_run)
    assert_same_weights(a.state_dict(), b.state_dict())


def test_finished_run_is_not_retrained(small_store, straight_run):
    before = tree_digest(straight_run)
    assert run_fit(fit_cfg(small_store, straight_run))["already_finished"]
    assert tree_digest(straight_run) == before


# ---- export -----------------------------------------------------------------------------------------------
def test_exported_clt_reproduces_training_reconstructions(small_store, straight_run):
    store = ActivationStore(small_store)
    x16, y16 = store.read_chunk(0)
    x = torch.from_numpy(x16[:200]).float()
    meta = json.loads((straight_run / rundir.RUN_FILE).read_text())
    spec = CLTSpec.from_dict(meta["spec"])
    trained = CrossLayerTranscoder(spec)
    trained.load_state_dict(final_weights(straight_run))  # training parametrisation + standardisation buffers
    assert not torch.equal(trained.out_scale, torch.ones(L))  # the fold has something to do
    exported, _ = load_fitted(straight_run)
    fresh = CrossLayerTranscoder(CLTSpec.from_dict(meta["spec"]))
    fresh.load_state_dict(exported.state_dict())
    with torch.no_grad():
        want = trained(x).recon
        for model in (exported, fresh):
            out = model(x)
            torch.testing.assert_close(out.recon, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            assert torch.equal(out.top_idx, trained(x).top_idx)
    assert torch.equal(exported.in_scale, torch.ones(L)) and torch.equal(exported.out_scale, torch.ones(L))


# ---- loader -----------------------------------------------------------------------------------------------
def take(loader: ChunkLoader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_deterministic_per_seed(id_store):
    store = ActivationStore(id_store)
    runs = []
    for seed in (5, 5, 6):
        loader = ChunkLoader(store, 100, seed=seed, shuffle_chunks=3, read_threads=2)
        runs.append([row_ids(b) for b in take(loader, 12)])
        loader.close()
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_loader_batches_survive_later_batches(id_store):
    """A batch the consumer keeps must not change when later batches (and windows) are made, and every row must
    still belong to the image it is labelled with."""
    store = ActivationStore(id_store)
    loader = ChunkLoader(store, 100, seed=3, shuffle_chunks=3, read_threads=2)
    kept, copies = [], []
    for batch in take(loader, 30):  # several windows, many turns of the ring
        kept.append(batch)
        copies.append((batch.x.clone(), batch.y.clone()))
    loader.close()
    for batch, (x, y) in zip(kept, copies):
        assert torch.equal(batch.x, x) and torch.equal(batch.y, y)
        assert np.array_equal(row_ids(batch) // T, batch.image)
    assert len({tuple(row_ids(b)[:5]) for b in kept}) == 30  # distinct batches, not one buffer seen 30 times


def test_loader_epoch_covers_train_split_once(id_store):
    store = ActivationStore(id_store)
    lay = store.layout
    B, holdout = 100, 0.2
    loader = ChunkLoader(store, B, holdout=holdout, seed=1, shuffle_chunks=3, read_threads=2)
    train, held = split_chunks(lay.n_chunks, holdout)
    assert len(held) == 4 and len(train) == lay.n_chunks - 4
    by_window: dict[int, list[np.ndarray]] = {}
    it = iter(loader)
    while True:
        batch = next(it)
        st = loader.state_dict()
        if st["epoch"] > 0:
            break
        ids = row_ids(batch)
        # y = -x row for row: inputs and targets stay paired through the shuffle
        torch.testing.assert_close(batch.y, -batch.x)
        assert np.array_equal(batch.image, ids // T)
        assert 0 < batch.image_diversity <= 1
        by_window.setdefault(st["window"], []).append(ids)
    loader.close()
    seen = np.concatenate([np.concatenate(v) for v in by_window.values()])
    assert len(np.unique(seen)) == len(seen), "a row appeared twice in one epoch"
    chunk_of = seen // lay.rows_per_chunk
    assert set(chunk_of) <= set(train.tolist()), "a held-out chunk reached training"
    train_rows = sum(len(lay.chunk_rows(int(c))) for c in train)
    n_windows = -(-len(train) // loader.shuffle_chunks)
    assert len(by_window) == n_windows
    assert 0 <= train_rows - len(seen) < B * n_windows
    for ids in by_window.values():  # each window drops only its last partial batch
        ids = np.concatenate(ids)
        chunks = np.unique(ids // lay.rows_per_chunk)
        window_rows = sum(len(lay.chunk_rows(int(c))) for c in chunks)
        assert 0 <= window_rows - len(ids) < B


def test_loader_heldout_split_only_heldout(id_store):
    store = ActivationStore(id_store)
    _, held = split_chunks(store.layout.n_chunks, 0.2)
    loader = ChunkLoader(store, 50, split="heldout", holdout=0.2, seed=0, shuffle_chunks=2)
    chunks = np.concatenate([row_ids(b) for b in take(loader, 10)]) // store.layout.rows_per_chunk
    loader.close()
    assert set(chunks) <= set(held.tolist())


def test_loader_cls_filter(id_store):
    store = ActivationStore(id_store)
    loader = ChunkLoader(store, 64, tokens="cls", seed=0, shuffle_chunks=2)
    assert loader.rows_per_epoch == store.layout.n_images
    it, batches = iter(loader), []
    while True:
        batch = next(it)
        if loader.state_dict()["epoch"] > 0:
            break
        batches.append(row_ids(batch))
    loader.close()
    ids = np.concatenate(batches)
    assert len(batches) >= 8
    assert (ids % T == 0).all()
    assert len(np.unique(ids)) == len(ids)


def test_loader_state_dict_resume(id_store):
    store = ActivationStore(id_store)
    a = ChunkLoader(store, 70, seed=2, shuffle_chunks=3)
    it = iter(a)
    for _ in range(9):  # crosses window boundaries
        next(it)
    state = a.state_dict()
    want = [row_ids(next(it)) for _ in range(25)]  # and an epoch boundary
    a.close()
    b = ChunkLoader(store, 70, seed=2, shuffle_chunks=3)
    b.load_state_dict(state)
    got = [row_ids(x) for x in take(b, 25)]
    b.close()
    assert all(np.array_equal(u, v) for u, v in zip(want, got))
    c = ChunkLoader(store, 70, seed=3, shuffle_chunks=3)
    with pytest.raises(ValueError):
        c.load_state_dict(state)
    c.close()


# ---- bad input --------------------------------------------------------------------------------------------
def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_store(tmp_path):
    with pytest.raises(StoreError) as e:
        run_fit(fit_cfg(str(tmp_path / "nope.zarr"), tmp_path / "out"))
    assert "not found" in one_line(e)
    assert not (tmp_path / "out" / rundir.RUN_FILE).exists()


def test_incomplete_store(tmp_path):
    url = str(tmp_path / "inc.zarr")
    write_store(url, 256, T, L, D, RandomRows(T, L, D), chunk_mb=1 / 16, commit=lambda s: s != 1)
    with pytest.raises(StoreError) as e:
        run_fit(fit_cfg(url, tmp_path / "out"))
    assert "incomplete" in one_line(e)


def test_unknown_format_version(small_store, tmp_path):
    url = str(tmp_path / "v99.zarr")
    shutil.copytree(small_store, url)
    g = zarr.open_group(url, mode="r+")
    meta = dict(g.attrs[F.ATTRS_KEY], format_version=99)
    g.attrs[F.ATTRS_KEY] = meta
    with pytest.raises(StoreError) as e:
        run_fit(fit_cfg(url, tmp_path / "out"))
    assert "v99" in one_line(e)


@pytest.mark.parametrize("k", [0, -3])
def test_k_not_positive(k):
    with pytest.raises(ConfigError) as e:
        build(FitConfig, {"k": k})
    assert "k" in one_line(e)


@pytest.mark.parametrize("k", [64, 100])
def test_k_not_below_n_features_at_build(k):
    with pytest.raises(ConfigError):
        build(FitConfig, {"k": k, "n_features": 64})


@pytest.mark.parametrize("kw", [{"k": 64, "n_features": 64}, {"k": 256, "expansion": 8}])
def test_k_not_below_features_at_fit(small_store, tmp_path, kw):
    with pytest.raises(ConfigError) as e:
        run_fit(fit_cfg(small_store, tmp_path / "out", **kw))
    assert "k:" in one_line(e)
    assert not list((tmp_path / "out").rglob("*.*"))  # nothing written


def test_out_dir_of_other_config_refused(small_store, straight_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(straight_run, out)
    before = tree_digest(out)
    for kw in ({"lr": 1e-3}, {"lr": 1e-3, "resume": True}, {"k": 3}):
        with pytest.raises(CheckpointError) as e:
            run_fit(fit_cfg(small_store, out, **kw))
        assert "other settings" in one_line(e)
        assert tree_digest(out) == before
    # an unfinished run of the same settings needs --resume
    out2 = tmp_path / "unfinished"
    with pytest.raises(Interrupt):
        run_fit(fit_cfg(small_store, out2, checkpoint_every=10), on_step=interrupt_at(12))
    before = tree_digest(out2)
    with pytest.raises(CheckpointError) as e:
        run_fit(fit_cfg(small_store, out2))
    assert "--resume" in one_line(e)
    assert tree_digest(out2) == before


def test_corrupt_latest_checkpoint_falls_back(small_store, straight_run, tmp_path, capsys):
    out = tmp_path / "corrupt"
    with pytest.raises(Interrupt):
        run_fit(fit_cfg(small_store, out, checkpoint_every=5), on_step=interrupt_at(15))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000010", "step-00000015"]
    bad = out / "checkpoints" / "step-00000015" / "model.safetensors"
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size // 2)
    corrupt_bytes = bad.read_bytes()
    prev = tree_digest(out / "checkpoints" / "step-00000010")
    seen = {}

    def watch(step: int) -> None:
        if not seen:  # the first step after resuming, before any new checkpoint is written
            seen["step"] = step
            seen["prev_kept"] = tree_digest(out / "checkpoints" / "step-00000010") == prev
            seen["corrupt_kept"] = bad.exists() and bad.read_bytes() == corrupt_bytes

    result = run_fit(fit_cfg(small_store, out, checkpoint_every=5, resume=True), on_step=watch)
    assert "skipping checkpoint step-00000015" in capsys.readouterr().out
    assert seen == {"step": 11, "prev_kept": True, "corrupt_kept": True}
    assert result["steps"] == 20 and json.loads((out / rundir.RUN_FILE).read_text())["finished"]
    assert_same_weights(final_weights(out), final_weights(straight_run))  # resumed exactly from step 10
    assert metrics_lines(out) == metrics_lines(straight_run)


def test_every_checkpoint_corrupt_is_a_clear_error(small_store, tmp_path):
    out = tmp_path / "allbad"
    with pytest.raises(Interrupt):
        run_fit(fit_cfg(small_store, out, checkpoint_every=5), on_step=interrupt_at(10))
    for p in ckpt.list_checkpoints(out):
        (p / "model.safetensors").write_bytes(b"garbage")
    before = tree_digest(out)
    with pytest.raises(CheckpointError) as e:
        run_fit(fit_cfg(small_store, out, checkpoint_every=5, resume=True), on_step=lambda s: None)
    assert "no usable checkpoint" in one_line(e)
    assert tree_digest(out) == before


def test_errors_are_cltpipe_errors():
    assert issubclass(StoreError, CltPipeError) and issubclass(ConfigError, CltPipeError)
