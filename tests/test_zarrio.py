"""The direct chunk read (clt_pipe/store/zarrio.py: stored blosc bytes decompressed straight into the caller's
buffer) against zarr's own read of the same rows, and its refusal of a frame that would not fill the chunk."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from clt_pipe.store import zarrio
from clt_pipe.store.reader import ActivationStore
from clt_pipe.testing.synthstore import RandomRows, write_store

T, L, D = 5, 3, 16


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("zio") / "s.zarr")
    # 37 images x 5 tokens = 185 rows in chunks of ~40: the last chunk is partial (zarr's path)
    write_store(url, 37, T, L, D, RandomRows(T, L, D, seed=4), compressor="blosc-lz4-bitshuffle", chunk_mb=0.004)
    return url


def test_direct_reads_equal_zarrs_for_every_chunk(store, monkeypatch):
    s = ActivationStore(store, check_reads=False)
    lay = s.layout
    assert lay.n_tokens % lay.rows_per_chunk != 0  # a partial last chunk is among them
    direct = []
    real = zarrio._blosc_into
    monkeypatch.setattr(zarrio, "_blosc_into", lambda src, out: (direct.append(out.shape[0]), real(src, out)))
    for name in ("mlp_in", "mlp_out"):
        arr = s.array(name)
        blocks = []
        for c in range(lay.n_chunks):
            rows = lay.chunk_rows(c)
            blocks.append((arr, slice(rows.start, rows.stop), np.full((len(rows), L, D), 7, arr.dtype)))
        zarrio.read_rows_into(blocks)
        for _arr, rows, out in blocks:
            np.testing.assert_array_equal(out, arr[rows])  # zarr's own read, bit for bit
    assert len(direct) == 2 * (lay.n_chunks - 1)  # every whole chunk went the direct way, the partial one did not


def test_a_frame_that_would_not_fill_the_chunk_is_refused(store, tmp_path):
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    g = zarr.open_group(str(bad), mode="r+")
    arr = g["mlp_in"]
    n = arr.metadata.chunks[0]
    # a valid blosc frame of half a chunk where chunk 0 belongs: blosc alone would fill half and leave the rest
    half = arr[0:n // 2]
    key0, key1 = zarrio.chunk_key(arr, 0), zarrio.chunk_key(arr, 1)
    assert (bad / key0).exists() and (bad / key1).exists()
    from numcodecs import Blosc

    (bad / key0).write_bytes(Blosc(cname="lz4", shuffle=Blosc.BITSHUFFLE).encode(np.ascontiguousarray(half)))
    out = np.zeros((n, L, D), arr.dtype)
    with pytest.raises(ValueError, match="blosc frame holds"):
        zarrio.read_rows_into([(arr, slice(0, n), out)])
