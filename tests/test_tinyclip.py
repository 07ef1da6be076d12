"""Digits dataset + the project's own tiny CLIP (training, determinism, zero-shot accuracy, cache)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from clt_pipe.checksums import file_sha256
from clt_pipe.datasets.base import DatasetError, ImageDataset
from clt_pipe.datasets.digits import CLASS_NAMES, DigitsDataset, load_digits_arrays
from clt_pipe.demo import tinyclip as tc
from tests.conftest import FEW_DIGITS, SHORT_EPOCHS, few_training_digits

# ------------------------------------------------------------------------------------------ dataset
def _sources(ds: DigitsDataset) -> list[int]:
    return [int(ds.record(i).source.split("#")[1]) for i in range(len(ds))]


def test_digits_splits_disjoint_cover_all_and_stratified():
    train, test, full = DigitsDataset("train"), DigitsDataset("test"), DigitsDataset("all")
    assert isinstance(train, ImageDataset) and train.name == "digits"
    assert len(full) == 1797 and _sources(full) == list(range(1797))
    tr, te = set(_sources(train)), set(_sources(test))
    assert not tr & te
    assert tr | te == set(range(1797))
    assert abs(len(te) / 1797 - 0.2) < 0.01
    _, y_all, _ = load_digits_arrays("all")
    counts_all = np.bincount(y_all, minlength=10)
    counts_test = np.bincount([test.record(i).label for i in range(len(test))], minlength=10)
    # stratified: every class holds (to rounding) 20% of its images in test
    assert np.all(np.abs(counts_test - np.round(counts_all * 0.2)) <= 0), (counts_test, counts_all)
    # records carry the true label of their source image
    for ds in (train, test):
        for i in (0, len(ds) // 2, len(ds) - 1):
            r = ds.record(i)
            assert r.index == i and r.labels == (r.label,) and r.label == int(y_all[int(r.source.split("#")[1])])


def test_digits_split_is_deterministic_and_seeded():
    assert _sources(DigitsDataset("test", seed=0)) == _sources(DigitsDataset("test", seed=0))
    assert _sources(DigitsDataset("test", seed=0)) != _sources(DigitsDataset("test", seed=1))
    assert len(DigitsDataset("test", test_fraction=0.5)) > len(DigitsDataset("test"))
    with pytest.raises(DatasetError):
        DigitsDataset("validation")
    with pytest.raises(IndexError):
        DigitsDataset("test").record(10_000)


def test_digits_images_are_rgb_and_show_the_digit():
    ds = DigitsDataset("all")
    assert ds.class_names == CLASS_NAMES and ds.templates["single"] == ["a photo of the number {c}."]
    assert len(ds.templates["ensemble"]) >= 3 and all("{c}" in t for t in ds.templates["ensemble"])
    raw, _, _ = load_digits_arrays("all")
    for i in (0, 1, 500):
        img = ds.load_image(i)
        assert img.mode == "RGB" and img.size == (32, 32)
        a = np.asarray(img).astype(np.float64)
        assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
        assert a.max() > 200 and a.min() < 30  # bright ink on a dark background
        # downsampled back to 8x8 the picture matches the source digit (white digit on black)
        small = a[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
        assert np.corrcoef(small.ravel(), raw[i].ravel())[0, 1] > 0.9
    assert not np.array_equal(np.asarray(ds.load_image(0)), np.asarray(ds.load_image(1)))


def test_training_tensor_matches_open_clip_preprocess():
    model, preprocess, _ = tc.load_tiny_clip()
    ds = DigitsDataset("test")
    raw, _, _ = load_digits_arrays("test")
    fast = tc._normalize(tc._image_tensor(raw[:5]))
    slow = torch.stack([preprocess(ds.load_image(i)) for i in range(5)])
    assert torch.allclose(fast, slow, atol=1e-5)


# ----------------------------------------------------------------------------------------- training
def test_short_training_writes_loadable_checkpoint_with_meta(tiny_clip_short_run):
    arts, calls = tiny_clip_short_run
    assert [c[0] for c in calls] == list(range(1, SHORT_EPOCHS + 1)) and all(np.isfinite(c[2]) for c in calls)
    assert calls[-1][2] < calls[0][2]  # the loss went down
    meta = json.loads((arts.checkpoint_path.parent / tc.META_FILE).read_text())
    assert meta == arts.meta
    assert meta["seed"] == 0 and meta["epochs"] == SHORT_EPOCHS
    assert meta["n_train"] + meta["n_test"] == 1797 and meta["n_test"] == len(DigitsDataset("test"))
    assert meta["checkpoint_sha256"] == file_sha256(arts.checkpoint_path)
    assert meta["wall_time_s"] > 0
    # open_clip itself loads the plain state_dict checkpoint
    import open_clip

    open_clip.add_model_config(arts.config_path)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(arts.checkpoint_path))
    sd = torch.load(arts.checkpoint_path, weights_only=True)
    assert torch.equal(model.state_dict()["visual.proj"], sd["visual.proj"])
    # and the zero-shot accuracy it reaches even on the short schedule is far above chance (0.1)
    tok = open_clip.get_tokenizer("tiny-clip")
    acc = tc.zero_shot_accuracy(model.eval(), tok, preprocess, DigitsDataset("test"), ["a photo of the number {c}."])
    assert acc == pytest.approx(meta["zero_shot_top1_test"])
    assert acc >= 0.5, acc


def test_untrained_model_is_near_chance():
    model, preprocess, tok = tc.load_tiny_clip()
    acc = tc.zero_shot_accuracy(model, tok, preprocess, DigitsDataset("test"), "single")
    assert acc < 0.35  # so the trained accuracy above measures learning, not the metric


def test_same_seed_gives_identical_checkpoint(tiny_clip_few_steps, tmp_path):
    with few_training_digits():
        again = tc.train_tiny_clip(tmp_path / "again", seed=0, epochs=1)
    assert again.meta["n_train"] == FEW_DIGITS
    assert again.meta["checkpoint_sha256"] == tiny_clip_few_steps.meta["checkpoint_sha256"]
    assert file_sha256(again.checkpoint_path) == file_sha256(tiny_clip_few_steps.checkpoint_path)


def test_different_seed_gives_different_checkpoint(tiny_clip_few_steps, tmp_path):
    with few_training_digits():
        other = tc.train_tiny_clip(tmp_path / "b", seed=1, epochs=1)
    assert other.meta["checkpoint_sha256"] != tiny_clip_few_steps.meta["checkpoint_sha256"]


# -------------------------------------------------------------------------------------------- cache
def _copying_trainer(trained):
    """Stands in for ``train_tiny_clip``: the cache logic around training is under test here, not training
    itself (the tests above cover that), so 'training' copies the session's short-run artifacts."""

    def train(out_dir, seed=0, epochs=tc.DEFAULT_EPOCHS, progress=None, **_kw):
        assert (seed, epochs) == (0, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in trained.checkpoint_path.parent.iterdir():
            shutil.copy2(f, out_dir / f.name)
        if progress is not None:
            progress(1, 1, trained.meta["final_loss"])
        return tc.read_valid_cache(out_dir, seed, epochs=epochs)

    return train


def test_ensure_tiny_clip_caches_and_rejects_partial(tmp_path, monkeypatch, tiny_clip_few_steps):
    monkeypatch.setattr(tc, "train_tiny_clip", _copying_trainer(tiny_clip_few_steps))
    cache = tmp_path / "cache" / "tiny-clip-seed0"
    calls = []
    first = tc.ensure_tiny_clip(cache, seed=0, epochs=1, progress=lambda *a: calls.append(a))
    assert calls and first.checkpoint_path.parent == cache
    assert not [p for p in cache.parent.iterdir() if p.name != cache.name]  # temp dir renamed away
    mtime = first.checkpoint_path.stat().st_mtime_ns

    calls.clear()
    second = tc.ensure_tiny_clip(cache, seed=0, epochs=1, progress=lambda *a: calls.append(a))
    assert not calls and second.checkpoint_path.stat().st_mtime_ns == mtime
    assert second.meta["checkpoint_sha256"] == first.meta["checkpoint_sha256"]

    # a different seed or schedule does not accept this cache
    assert tc.read_valid_cache(cache, seed=1, epochs=1) is None
    assert tc.read_valid_cache(cache, seed=0, epochs=2) is None

    # corrupted checkpoint -> sha mismatch -> not accepted, retrained
    with open(first.checkpoint_path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    assert tc.read_valid_cache(cache, seed=0, epochs=1) is None
    calls.clear()
    third = tc.ensure_tiny_clip(cache, seed=0, epochs=1, progress=lambda *a: calls.append(a))
    assert calls and file_sha256(third.checkpoint_path) == first.meta["checkpoint_sha256"]

    # meta missing (a killed run) -> not accepted
    (cache / tc.META_FILE).unlink()
    assert tc.read_valid_cache(cache, seed=0, epochs=1) is None
    # meta unparsable -> not accepted
    (cache / tc.META_FILE).write_text("{")
    assert tc.read_valid_cache(cache, seed=0, epochs=1) is None


def test_killed_training_leaves_no_valid_cache(tmp_path, monkeypatch):
    cache = tmp_path / "tiny-clip-seed0"
    steps = []

    def interrupted_at_the_third_step(*args):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_loss(*args)

    real_loss = tc._clip_loss
    monkeypatch.setattr(tc, "_clip_loss", interrupted_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        tc.ensure_tiny_clip(cache, seed=0, epochs=2)
    assert len(steps) == 3
    assert not cache.exists()
    assert list(tmp_path.iterdir()) == []  # temp dir cleaned up too


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CLT_PIPE_CACHE", str(tmp_path))
    assert tc.default_cache_dir(3) == tmp_path / "tiny-clip-seed3"
    monkeypatch.delenv("CLT_PIPE_CACHE")
    assert tc.default_cache_dir(0).name == "tiny-clip-seed0" and ".cache" in tc.default_cache_dir(0).parts


@pytest.mark.slow
def test_full_schedule_reaches_high_zero_shot_accuracy(tmp_path):
    arts = tc.ensure_tiny_clip(tmp_path / "tiny-clip-seed0", seed=0)
    assert arts.meta["epochs"] == tc.DEFAULT_EPOCHS
    model, preprocess, tok = tc.load_tiny_clip(arts)
    acc = tc.zero_shot_accuracy(model, tok, preprocess, DigitsDataset("test"), "single")
    assert acc == pytest.approx(arts.meta["zero_shot_top1_test"])
    assert acc >= 0.8, acc
