"""Property tests (hypothesis): layout arithmetic, moment merges and the token vocabularies hold for any sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clt_pipe.errors import ConfigError
from clt_pipe.store import format as F
from clt_pipe.store.meta import ABSENT, StoreMeta
from clt_pipe.store.stats import Moments
from clt_pipe.testing.synthstore import synthetic_meta
from clt_pipe.tokens import TOKEN_TYPES, TokenPolicy, token_mask, token_positions

layouts = st.builds(F.StoreLayout, n_images=st.integers(1, 3000), tokens_per_image=st.integers(1, 260),
                    n_layers=st.integers(1, 24), d_model=st.integers(1, 1024), images_per_chunk=st.integers(1, 400),
                    chunks_per_shard=st.integers(1, 16))


def _concat(ranges) -> list[int]:
    return [i for r in ranges for i in r]


@settings(max_examples=200, deadline=None)
@given(layouts)
def test_chunks_and_shards_partition_images_and_rows(lay: F.StoreLayout):
    chunks = [lay.chunk_images(c) for c in range(lay.n_chunks)]
    assert _concat(chunks) == list(range(lay.n_images))
    assert all(0 < len(r) <= lay.images_per_chunk for r in chunks)
    rows = [lay.chunk_rows(c) for c in range(lay.n_chunks)]
    assert _concat(rows) == list(range(lay.n_tokens))
    assert all(len(r) == len(i) * lay.tokens_per_image <= lay.rows_per_chunk for r, i in zip(rows, chunks))
    assert sum(lay.activation_bytes(2, len(r)) for r in rows) == lay.activation_bytes(2)

    shard_chunks = [lay.shard_chunks(s) for s in range(lay.n_shards)]
    assert _concat(shard_chunks) == list(range(lay.n_chunks))  # every chunk in exactly one shard, in order
    assert all(0 < len(c) <= lay.chunks_per_shard for c in shard_chunks)
    for s, cs in enumerate(shard_chunks):  # a shard's images are exactly its chunks' images
        assert list(lay.shard_images(s)) == _concat(lay.chunk_images(c) for c in cs)


@settings(max_examples=300, deadline=None)
@given(n_images=st.integers(1, 100_000), tokens_per_image=st.integers(1, 300), n_layers=st.integers(1, 48),
       d_model=st.integers(1, 2048), chunk_mb=st.floats(0.01, 512), chunks_per_shard=st.integers(1, 16))
def test_plan_sizes_chunks_near_chunk_mb(n_images, tokens_per_image, n_layers, d_model, chunk_mb, chunks_per_shard):
    lay = F.StoreLayout.plan(n_images, tokens_per_image, n_layers, d_model, F.ACTIVATION_ITEMSIZE, chunk_mb,
                             chunks_per_shard)
    image_bytes = lay.activation_bytes(1, tokens_per_image)
    chunk_bytes = lay.activation_bytes(1, lay.rows_per_chunk)
    target = chunk_mb * 2**20
    assert 1 <= lay.images_per_chunk <= n_images
    tol = 1e-6 * target
    if lay.images_per_chunk > 1:  # not clamped up to one image: at most half an image above the target
        assert chunk_bytes <= target + image_bytes / 2 + tol
    if lay.images_per_chunk < n_images:  # not clamped down to every image: at most half an image below
        assert chunk_bytes >= target - image_bytes / 2 - tol
    assert (lay.n_chunks - 1) * lay.images_per_chunk < n_images <= lay.n_chunks * lay.images_per_chunk


finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@settings(max_examples=150, deadline=None)
@given(rows=hnp.arrays(np.float64, st.tuples(st.integers(0, 60), st.integers(1, 4)), elements=finite),
       cuts=st.lists(st.integers(0, 60), max_size=6), pairwise=st.booleans())
def test_moments_merge_equals_moments_of_concatenation(rows, cuts, pairwise):
    bounds = [0, *sorted(min(c, len(rows)) for c in cuts), len(rows)]
    parts = [Moments.of(rows[a:b]) for a, b in zip(bounds, bounds[1:])]
    if pairwise:  # tree order, as shards finishing in any order merge
        while len(parts) > 1:
            parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        merged = parts[0]
    else:
        merged = Moments.empty(rows.shape[1:])
        for p in parts:
            merged = merged.merge(p)
    whole = Moments.of(rows)
    assert merged.count == whole.count == len(rows)
    scale = max(1.0, float(np.abs(rows).max())) if len(rows) else 1.0
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-9, atol=1e-9 * scale)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-7, atol=1e-7 * scale**2 * max(len(rows), 1))
    if len(rows):
        np.testing.assert_allclose(merged.var, rows.var(axis=0), rtol=1e-7, atol=1e-7 * scale**2)


policies = st.one_of(st.sampled_from(["cls", "patches", "all"]), st.integers(1, 500).map(lambda k: f"cls+{k}"))


@settings(max_examples=200, deadline=None)
@given(policy=policies, n_positions=st.integers(2, 300), image=st.integers(0, 10**6), seed=st.integers(0, 2**31))
def test_token_policy_round_trips_and_positions_are_sorted_unique_in_range(policy, n_positions, image, seed):
    p = TokenPolicy.parse(policy)
    assert str(p) == policy and TokenPolicy.parse(str(p)) == p
    pos = p.positions(n_positions, image, seed)
    assert pos.dtype == np.int16 and len(pos) == p.tokens_per_image(n_positions)
    assert pos[0] == (1 if p.kind == "patches" else 0)
    assert np.all(np.diff(pos) > 0) and pos[-1] < n_positions
    assert np.array_equal(pos, p.positions(n_positions, image, seed))  # a resumed shard picks the same patches


@settings(max_examples=100, deadline=None)
@given(pos=hnp.arrays(np.int16, st.integers(0, 50), elements=st.integers(-1, 300)))
def test_token_masks_split_rows_into_cls_and_patches(pos):
    m = {t: token_mask(pos, t) for t in TOKEN_TYPES}
    assert np.array_equal(m["cls"] | m["patches"], m["all"]) and not np.any(m["cls"] & m["patches"])
    assert np.array_equal(m["all"], pos >= 0)


@pytest.mark.parametrize("bad", ["", "cls+0", "cls+", "CLS", "patch", "all+3", "cls+-1"])
def test_token_policy_rejects_bad_strings(bad):
    with pytest.raises(ConfigError, match="tokens"):
        TokenPolicy.parse(bad)


def test_token_positions_of_each_type():
    assert token_positions("cls", 5).tolist() == [0]
    assert token_positions("patches", 5).tolist() == [1, 2, 3, 4]
    assert token_positions("all", 5).tolist() == [0, 1, 2, 3, 4]


# ---- store metadata: to_dict/from_dict round-trip the stored JSON exactly ----------------------------------------

def _stored_json(n_images, T, L, d, dtype, recompute, policy) -> dict:
    m = synthetic_meta(n_images, T, L, d, dtype=dtype).to_dict()
    m["tokens"]["policy"], m["tokens"]["k"] = policy, TokenPolicy.parse(policy).k
    if recompute:  # keys in the order the harvest writes them
        m["activations"] = {**{k: m["activations"][k] for k in ("dtype", "storage_dtype", "compressor")},
                            "forward_precision": "fp32", "targets": "recompute", "mlp_activation": "gelu",
                            "mlp_in": "x", "mlp_out": "y"}
    m.update(format_version=2 if recompute else 1, fingerprint="0123456789abcdef", created="now", tool_version="0",
             initialised=True)
    return m


@settings(max_examples=60, deadline=None)
@given(n_images=st.integers(1, 500), T=st.integers(1, 50), L=st.integers(1, 12), d=st.integers(1, 64),
       dtype=st.sampled_from(["fp16", "bf16"]), recompute=st.booleans(), policy=policies)
def test_store_meta_round_trips_the_stored_json(n_images, T, L, d, dtype, recompute, policy):
    m = _stored_json(n_images, T, L, d, dtype, recompute, policy)
    meta = StoreMeta.from_dict(m)
    assert json.dumps(meta.to_dict()) == json.dumps(m)  # same keys, same order: same bytes in zarr.json
    assert StoreMeta.from_dict(meta.to_dict()) == meta
    assert meta.recompute == recompute and meta.activation_arrays == (("mlp_in",) if recompute else
                                                                      ("mlp_in", "mlp_out"))
    assert str(meta.tokens.policy) == policy and meta.layout.n_images == n_images


def test_store_meta_keeps_keys_it_does_not_know_and_leaves_absent_keys_out():
    m = _stored_json(10, 5, 2, 8, "fp16", False, "all")
    m["model"]["from_a_newer_writer"] = [1, 2]
    m["future_section"] = {"x": 1}
    meta = StoreMeta.from_dict(m)
    assert meta.to_dict() == m and meta.model.ln_eps is ABSENT and "ln_eps" not in meta.to_dict()["model"]
    assert meta.activations.forward_precision is ABSENT and not meta.recompute


# ---- the run-ahead helper -----------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 30), ahead=st.integers(1, 6), stop=st.integers(0, 30))
def test_prefetched_yields_every_item_in_order_with_ahead_more_submitted(n, ahead, stop):
    from clt_pipe.prefetch import prefetched

    submitted: list[int] = []
    seen = []
    for item, handle in prefetched(range(n), lambda i: submitted.append(i) or -i, ahead):
        assert handle == -item
        assert submitted == list(range(min(n, item + 1 + ahead)))  # the next `ahead` run while this one is used
        seen.append(item)
        if len(seen) == stop:
            break
    assert seen == list(range(min(n, stop) if stop else n))
