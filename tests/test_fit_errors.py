"""Bad stores and settings stop `clt-pipe fit` with one line (CltPipeError), not a traceback."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from clt_pipe.checksums import crc32c
from clt_pipe.config import FitConfig, build
from clt_pipe.errors import CltPipeError, StoreError
from clt_pipe.fit.trainer import run_fit
from clt_pipe.store import format as F
from clt_pipe.store.identity import seal_record
from clt_pipe.store.location import StoreLocation
from clt_pipe.testing.synthstore import RandomRows, write_store

T, L, D = 4, 2, 16


def cfg(store: str, out, **kw) -> FitConfig:
    return build(FitConfig, {**dict(store=store, out=str(out), n_features=32, k=4, steps=2, batch_size=32,
                                    device="cpu"), **kw})


def test_non_finite_statistics_are_a_store_error(tmp_path):
    url = str(tmp_path / "s.zarr")
    write_store(url, 64, T, L, D, RandomRows(T, L, D))
    arr = zarr.open_group(url, mode="r+")[F.STATS_GROUP]["var_in"]
    arr[0, 0] = np.nan
    # As a harvest of non-finite activations would write it: the checksum matches the NaN, so reads pass and
    # the trainer's own check is what refuses the statistics.
    loc = StoreLocation(url)
    complete = loc.read_json(F.COMPLETE_FILE)
    complete["checksums"]["arrays"][f"{F.STATS_GROUP}/var_in"] = crc32c(arr[:])
    loc.write_json_atomic(F.COMPLETE_FILE, seal_record(complete))
    with pytest.raises(StoreError, match="non-finite"):
        run_fit(cfg(url, tmp_path / "out"))


def test_batch_larger_than_the_split_is_one_line(tmp_path):
    url = str(tmp_path / "s.zarr")
    write_store(url, 8, T, L, D, RandomRows(T, L, D))
    with pytest.raises(CltPipeError, match="fewer than one batch"):
        run_fit(cfg(url, tmp_path / "out", batch_size=64))
