"""The shuffle mixes: at the defaults, on a store several windows large, a batch touches at least 0.8x as many
distinct images as uniform sampling without replacement from all training rows would (exact expectation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clt_pipe.errors import CltPipeError
from clt_pipe.store import loader as loader_mod
from clt_pipe.store.loader import ChunkLoader, stratified_order
from clt_pipe.store.reader import ActivationStore
from clt_pipe.testing.synthstore import RandomRows, write_store

T, L, D = 10, 2, 16
N_IMAGES, B = 1200, 64


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    url = str(tmp_path_factory.mktemp("mix") / "mix.zarr")
    write_store(url, N_IMAGES, T, L, D, RandomRows(T, L, D), chunk_mb=1 / 64, chunks_per_shard=4)
    return ActivationStore(url)


def uniform_expected_distinct(rows_per_image: np.ndarray, batch: int) -> float:
    """Σ_i [1 − C(N−n_i, B)/C(N, B)]: expected distinct images in B rows drawn without replacement."""
    n = int(rows_per_image.sum())

    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1) if 0 <= b <= a else -math.inf

    total = log_comb(n, batch)
    return float(sum(1 - math.exp(log_comb(n - int(k), batch) - total) for k in rows_per_image))


def mean_distinct(loader: ChunkLoader, n_batches: int) -> float:
    it = iter(loader)
    counts = [len(np.unique(next(it).image)) for _ in range(n_batches)]
    loader.close()
    return float(np.mean(counts))


def test_default_shuffle_mixes_like_uniform_sampling(store, monkeypatch):
    lay = store.layout
    loader = ChunkLoader(store, B, seed=0)  # the defaults: auto window, default memory budget
    window_images = loader.shuffle_chunks * lay.images_per_chunk
    assert lay.n_chunks >= 4 * loader.shuffle_chunks, "the store must be several windows large"
    want = uniform_expected_distinct(np.full(N_IMAGES, T), B)
    got = mean_distinct(loader, 120)  # several windows and an epoch boundary
    assert got >= 0.8 * want, (got, want, window_images)

    # The same windows with a plain row permutation mix visibly worse: the bound is not met by accident.
    monkeypatch.setattr(loader_mod, "stratified_order", lambda image, rng: rng.permutation(len(image)))
    plain = mean_distinct(ChunkLoader(store, B, seed=0), 120)
    assert plain < 0.8 * want <= got


def test_stratified_order_is_a_permutation_that_spreads_each_image():
    image = np.repeat(np.arange(50), 7)
    order = stratified_order(image, np.random.default_rng(0))
    assert np.array_equal(np.sort(order), np.arange(len(image)))
    # every run of 50 consecutive rows (one round) holds 50 distinct images
    for r in range(7):
        assert len(np.unique(image[order[r * 50:(r + 1) * 50]])) == 50


def test_memory_budget_bounds_the_window(store):
    lay = store.layout
    row_bytes = L * D * 2 * 2
    budget_gib = 2 * 2 * lay.rows_per_chunk * row_bytes / 2**30  # two windows of 2 chunks
    small = ChunkLoader(store, B, seed=0, shuffle_memory=budget_gib)
    default = ChunkLoader(store, B, seed=0)
    assert small.shuffle_chunks == 2 < default.shuffle_chunks
    small.close()
    default.close()


def test_rank_without_chunks_is_one_line_error(store):
    with pytest.raises(CltPipeError, match="no chunks to read"):
        ChunkLoader(store, B, world_size=store.layout.n_chunks + 1, rank=store.layout.n_chunks)


def test_prefetched_first_window_is_used_or_dropped_exactly(store):
    """The start-up prefetch must not change the batches: used when the position is unchanged, dropped after a
    resume moved it."""
    def images(loader, n=6):
        it = iter(loader)
        out = [next(it).image.tolist() for _ in range(n)]
        loader.close()
        return out

    plain = images(ChunkLoader(store, B, seed=1))
    early = ChunkLoader(store, B, seed=1)
    early.prefetch()
    assert images(early) == plain
    moved_state = {"epoch": 1, "window": 2, "batch_in_window": 1, "seed": 1}
    ref = ChunkLoader(store, B, seed=1)
    ref.load_state_dict(moved_state)
    moved = ChunkLoader(store, B, seed=1)
    moved.prefetch()
    moved.load_state_dict(moved_state)
    assert images(moved) == images(ref)


def test_close_waits_for_running_reads_and_drops_the_rest(store, monkeypatch):
    """Once close() returns nothing reads the store: the read already running has finished, the queued ones
    never start."""
    import threading
    import time

    started, finished = [], []
    real = ChunkLoader._read_into

    def slow_read(self, chunks, x, y):
        started.append(chunks[0][0])
        time.sleep(0.3)
        real(self, chunks, x, y)
        finished.append(chunks[0][0])

    monkeypatch.setattr(ChunkLoader, "_read_into", slow_read)
    loader = ChunkLoader(store, B, seed=0, tokens="cls", read_threads=1)  # token-filtered: one read per chunk
    loader.prefetch()
    while not started:
        time.sleep(0.01)
    loader.close()
    assert started == finished and len(started) == 1  # the running read ended; the window's others never ran
    assert not [t for t in threading.enumerate() if t.name.startswith("clt-read")]
