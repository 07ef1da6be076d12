"""Nothing silently wrong (issue #21): one writer per output folder, the data a resume reads, non-finite
options, the store's own metadata under checksum, runs outside stores, finished stages on read-only mounts,
and one-line failures that name the real difference.

Each test is a row of the issue's table: it failed (exit 0 or a wrong/cut/traceback message) before the change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import zarr

from clt_pipe.config import AnalyzeConfig, AtlasConfig, FitConfig, HarvestConfig, build
from clt_pipe.errors import ConfigError, CltPipeError, StoreError
from clt_pipe.store import format as F
from clt_pipe.store.inspect import repair_store, verify_store
from clt_pipe.store.reader import ActivationStore
from clt_pipe.testing.synthstore import RandomRows, synthetic_meta, write_store
from tests.conftest import assert_one_line_error, run_cli

T, L, D = 4, 2, 8
IMAGES_PER_CHUNK = 16
CHUNK_MB = IMAGES_PER_CHUNK * T * L * D * 2 / 2**20
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A complete synthetic store: 64 images, 4 chunks of 16 images, 2 shards."""
    url = tmp_path_factory.mktemp("pristine") / "s.zarr"
    write_store(str(url), 64, T, L, D, RandomRows(T, L, D, seed=0), chunk_mb=CHUNK_MB, chunks_per_shard=2)
    return url


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    dst = tmp_path / "s.zarr"
    shutil.copytree(pristine, dst)
    return dst


def fit_args(url, out, *extra) -> list[str]:
    return ["fit", "--store", str(url), "--out", str(out), "--n-features", "16", "--k", "2", "--steps", "3",
            "--batch-size", "32", "--shuffle-chunks", "2", "--read-threads", "1", "--device", "cpu",
            "--warmup-steps", "1", "--dead-tokens", "100", *extra]


def edit_description(url: Path, edit) -> None:
    g = zarr.open_group(str(url), mode="r+")
    meta = json.loads(json.dumps(g.attrs[F.ATTRS_KEY]))
    edit(meta)
    g.attrs[F.ATTRS_KEY] = meta


def files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "harvest.lock"}  # the harvest lock is not data: every harvest takes it


# ---- row 1: one writer per run directory ---------------------------------------------------------------
def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(store, tmp_path, capsys, monkeypatch,
                                                                       warm_cli):
    out = tmp_path / "run"
    first = warm_cli(fit_args(store, out, "--steps", "1000000", "--checkpoint-every", "1000000"), tmp_path,
                     env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.time() + 120
        while not (out / "run.json").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr()
        os.kill(first.pid, signal.SIGSTOP)  # mid-run, holding what it holds, without using the CPU
        run_json = (out / "run.json").read_bytes()
        for extra in (["--overwrite"], ["--resume"]):  # --overwrite is what the "other settings" line recommends
            code, _, err = run_cli(capsys, monkeypatch, fit_args(store, out, *extra))
            assert_one_line_error(code, err, "in use", "clt-pipe fit", f"pid {first.pid}")
            assert (out / "run.json").read_bytes() == run_json  # nothing of the running fit was deleted
        for args in (["analyze", "--store", str(store), "--clt", str(out), "--out", str(out), "--device", "cpu",
                      "--only", "fidelity"],
                     ["atlas", "--store", str(store), "--clt", str(out), "--out", str(out), "--device", "cpu"],
                     ["export", str(out), str(out), "--store", str(store)]):
            code, _, err = run_cli(capsys, monkeypatch, args)
            assert_one_line_error(code, err, "in use", f"pid {first.pid}")
        assert first.poll() is None  # the first fit never noticed
    finally:
        first.kill()  # SIGKILL ends a stopped process too
        first.wait(timeout=60)
    # the kernel dropped the killed holder's lock: the folder is free again
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, out, "--overwrite"))
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["finished"]


CHILD_TAKES = """
import sys
from clt_pipe.errors import CltPipeError
from clt_pipe.outdir import hold_out_dir
try:
    with hold_out_dir(sys.argv[1], "analyze"):
        print("taken")
except CltPipeError as e:
    print(e)
"""


def test_hold_out_dir_is_reentrant_and_releases(tmp_path):
    from clt_pipe.outdir import LOCK_FILE, hold_out_dir

    def child() -> str:
        return subprocess.run([sys.executable, "-c", CHILD_TAKES, str(tmp_path / "r")], capture_output=True,
                              text=True, cwd=REPO, timeout=120).stdout.strip()

    with hold_out_dir(tmp_path / "r", "sweep"):
        with hold_out_dir(tmp_path / "r", "fit"):  # a sweep holding a member folder calls fit on it
            pass
        held = json.loads((tmp_path / "r" / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["command"] == "sweep"
        refused = child()
        assert "is in use: `clt-pipe sweep`" in refused and f"pid {os.getpid()}" in refused
    assert child() == "taken"


# ---- row 2: data identity on resume ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tiny_seeded_weights) -> Path:
    return tiny_seeded_weights


def harvest(store, root, weights, **kw) -> dict:
    from clt_pipe.harvest.run import run_harvest

    base = dict(model=str(TINY), pretrained=str(weights), dataset="imagefolder", data_root=str(root),
                store=str(store), chunk_mb=0.02, chunks_per_shard=2, batch_size=4, template_sets=["single"],
                tokens="all", device="cpu")  # 2 images a chunk: 8 images are 2 shards
    return run_harvest(build(HarvestConfig, {**base, **kw}), log=lambda *a, **k: None)


def test_resume_from_another_data_root_is_refused_unless_the_data_moved(tmp_path, weights):
    from clt_pipe.testing.fakedata import make_fake_imagefolder

    a = make_fake_imagefolder(tmp_path / "a", classes=("cat", "dog"), per_class=4)["root"]
    other = make_fake_imagefolder(tmp_path / "b", classes=("cat", "dog"), per_class=4, seed=7)["root"]  # same names
    url = tmp_path / "s.zarr"
    harvest(url, a, weights)
    (url / F.COMPLETE_FILE).unlink()  # a harvest killed before its last shard
    (url / F.shard_commit_name(1)).unlink()
    with pytest.raises(StoreError, match="dataset.content_sha256"):  # same names and labels, other pixels
        harvest(url, other, weights)
    with pytest.raises(StoreError, match="dataset.content_sha256"):  # saying the data moved does not help
        harvest(url, other, weights, data_moved=True)
    assert not (url / F.shard_commit_name(1)).exists()
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)  # the same files under another root: accepted when said so
    with pytest.raises(StoreError, match=r"harvested from data root .*/a, this run reads .*/moved.*--data-moved"):
        harvest(url, moved, weights)
    assert harvest(url, moved, weights, data_moved=True)["resumed_shards"] == 1
    assert verify_store(str(url))["complete"]


def test_content_fingerprint_reads_sizes_and_samples(tmp_path):
    from clt_pipe.datasets.content import content_sha256

    files = []
    for i in range(100):
        p = tmp_path / f"{i:03d}.bin"
        p.write_bytes(bytes([i]) * 100)
        files.append(p)
    before = content_sha256(files)
    assert content_sha256(files) == before and content_sha256([]) is None
    files[0].write_bytes(b"x" * 100)  # same size, other bytes, a sampled file
    assert content_sha256(files) != before
    files[0].write_bytes(bytes([0]) * 100)
    os.utime(files[50], (0, 0))  # mtimes are not content: a copy matches
    assert content_sha256(files) == before


# ---- rows 3 and 8: non-finite options --------------------------------------------------------------------
def _float_fields():
    for cls in (HarvestConfig, FitConfig, AnalyzeConfig, AtlasConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is float:
                yield cls, f.name


@pytest.mark.parametrize(("cls", "name"), list(_float_fields()), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan")])
def test_every_float_option_refuses_non_finite_values(cls, name, value):
    with pytest.raises(ConfigError, match=rf"{name}: expected a finite number"):
        build(cls, {name: value})


@pytest.mark.parametrize("args", [["--lr", "inf"], ["--lr", "nan"], ["--lr", "1e30"], ["--aux-coef", "nan"]])
def test_fit_non_finite_or_absurd_lr_is_one_line(store, tmp_path, capsys, monkeypatch, args):
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, tmp_path / "run", *args))
    assert_one_line_error(code, err, args[0][2:].replace("-", "_"))
    assert not (tmp_path / "run").exists()


def test_harvest_chunk_mb_nan_is_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, ["harvest", "--chunk-mb", "nan", "--dataset", "digits",
                                                 "--model", str(TINY), "--pretrained", "none", "--limit", "8",
                                                 "--device", "cpu", "--store", str(tmp_path / "s.zarr")])
    assert_one_line_error(code, err, "chunk_mb", "finite")


# ---- row 4: metadata under checksum ----------------------------------------------------------------------
EDITS = {
    "model.name": lambda m: m["model"].update(name="ViT-L-14"),
    "model.pretrained": lambda m: m["model"].update(pretrained="laion2b"),
    "model.weights_sha256": lambda m: m["model"].update(weights_sha256="1" * 64),
    "dataset.class_names": lambda m: m["dataset"].update(class_names=["x", "y"]),
    "layout.n_images": lambda m: m["layout"].update(n_images=48),
}


@pytest.mark.parametrize("field", list(EDITS))
def test_an_edited_store_description_is_named_by_every_reader(store, field, capsys, monkeypatch):
    edit_description(store, EDITS[field])
    before = files_of(store)
    with pytest.raises(StoreError, match=rf"edited after the harvest \({field}"):
        ActivationStore(str(store))
    for cmd in (["store", "info"], ["store", "verify"], ["store", "repair"]):
        code, out, err = run_cli(capsys, monkeypatch, [*cmd, str(store)])
        assert_one_line_error(code, err, field, "edited")
    assert files_of(store) == before  # repair did not act on it


def test_a_store_without_the_seal_is_checked_through_its_fingerprint(store):
    edit_description(store, lambda m: m.pop("identity_crc32c"))
    assert ActivationStore(str(store)).is_complete  # older stores read as before
    edit_description(store, EDITS["model.name"])
    with pytest.raises(StoreError, match="does not hash to its fingerprint"):
        ActivationStore(str(store))


def test_repair_refuses_a_layout_that_no_longer_matches_its_commits(store):
    path = store / F.shard_commit_name(1)
    rec = json.loads(path.read_text())
    path.write_text(json.dumps(dict(rec, images=[0, 16])))
    before = files_of(store)
    with pytest.raises(StoreError, match="layout no longer matches its commit records"):
        repair_store(str(store))
    assert files_of(store) == before


@pytest.mark.parametrize(("key", "value"), [("n_images", 48), ("n_shards", 1), ("n_valid_tokens", 7),
                                            ("finished", "2020-01-01T00:00:00+00:00")])
def test_edited_complete_json_is_named_and_repaired(store, key, value, capsys, monkeypatch):
    path = store / F.COMPLETE_FILE
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **{key: value})))
    with pytest.raises(StoreError, match=key if key != "finished" else "checksum"):
        ActivationStore(str(store))
    code, _, err = run_cli(capsys, monkeypatch, ["store", "verify", str(store)])
    assert code != 0 and (key if key != "finished" else "checksum") in err
    out = repair_store(str(store))
    assert out["dropped_shards"] == [] and not path.exists()  # the next harvest finalises again


def test_edited_complete_fingerprint_names_both_sides(store, capsys, monkeypatch):
    path = store / F.COMPLETE_FILE
    rec = json.loads(path.read_text())
    path.write_text(json.dumps(dict(rec, fingerprint="0123456789abcdef")))
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, store.parent / "run"))
    line = assert_one_line_error(code, err, "0123456789abcdef", rec["fingerprint"])
    assert "no complete.json" not in line.lower()


# ---- row 5: runs outside stores ----------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["fit", "analyze", "atlas", "export"])
def test_out_inside_a_store_is_refused(store, tmp_path, cmd, capsys, monkeypatch):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, run))
    assert code == 0, err
    inside = store / "runs" / cmd
    args = {"fit": fit_args(store, inside),
            "analyze": ["analyze", "--store", str(store), "--clt", str(run), "--out", str(inside), "--device",
                        "cpu", "--only", "fidelity"],
            "atlas": ["atlas", "--store", str(store), "--clt", str(run), "--out", str(inside), "--device", "cpu"],
            "export": ["export", str(run), str(inside), "--store", str(store)]}[cmd]
    code, _, err = run_cli(capsys, monkeypatch, args)
    assert_one_line_error(code, err, "inside the activation store", str(store.resolve()))
    assert not (store / "runs").exists()


def test_overwriting_a_store_names_what_else_lives_under_it(store):
    from clt_pipe.store.writer import StoreWriter

    (store / "runs" / "clt").mkdir(parents=True)
    (store / "runs" / "clt" / "run.json").write_text("{}")
    (store / "notes.txt").write_text("keep me")
    meta = synthetic_meta(64, T, L, D, chunk_mb=CHUNK_MB, chunks_per_shard=2)
    before = files_of(store)
    with pytest.raises(StoreError, match=r"also holds notes.txt, runs, which are not part of the store.*nothing was "
                                         r"deleted"):
        StoreWriter.open(str(store), meta, overwrite=True)
    assert files_of(store) == before


# ---- row 6: a finished stage on a read-only mount --------------------------------------------------------
@contextlib.contextmanager
def read_only(path: Path, monkeypatch):
    """``path`` on a read-only bind mount where this process may mount (root); else the lock's first write
    fails as a read-only mount makes it fail."""
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode == 0:
        try:
            yield "mount"
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    if ok:
        subprocess.run(["umount", str(path)], check=True)
    import errno

    from clt_pipe.store import lock

    def refuse(self):
        raise OSError(errno.EROFS, "Read-only file system", self.key)

    monkeypatch.setattr(lock.HarvestLock, "_acquire_local", refuse)
    yield "patched"


def test_run_skips_a_finished_harvest_on_a_read_only_mount(tmp_path, weights, capsys, monkeypatch):
    from clt_pipe.testing.fakedata import make_fake_imagefolder

    data = make_fake_imagefolder(tmp_path / "d", classes=("cat", "dog"), per_class=4)["root"]
    url = tmp_path / "ro" / "s.zarr"
    url.parent.mkdir()
    pipe = tmp_path / "p.toml"
    pipe.write_text(f"""
[harvest]
model = "{TINY}"
pretrained = "{weights}"
dataset = "imagefolder"
data_root = "{data}"
store = "{url}"
chunk_mb = 0.02
chunks_per_shard = 2
batch_size = 4
template_sets = ["single"]
tokens = "cls"
device = "cpu"

[fit]
out = "{tmp_path / 'run'}"
n_features = 16
k = 2
steps = 2
batch_size = 4
warmup_steps = 1
device = "cpu"
""")
    code, _, err = run_cli(capsys, monkeypatch, ["run", str(pipe), "--only", "harvest"])
    assert code == 0, err
    before = files_of(url)
    with read_only(url.parent, monkeypatch):
        code, _, err = run_cli(capsys, monkeypatch, ["run", str(pipe)])
        assert code == 0, err
        assert "nothing to do" in err and "read-only" in err
        assert files_of(url) == before
    assert json.loads((tmp_path / "run" / "run.json").read_text())["finished"]


# ---- row 7: disk full while fit writes a checkpoint ------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_disk_full_at_checkpoint_time_says_so(store, tmp_path, capsys, monkeypatch):
    with small_tmpfs(tmp_path / "small", "1m") as small:
        out = small / "run"
        # ~1.5 MB of weights and AdamW moments: run.json and metrics fit, the checkpoint does not
        code, _, err = run_cli(capsys, monkeypatch, fit_args(store, out, "--n-features", "4096"))
        line = assert_one_line_error(code, err, "disk full", "checkpoint")
        assert "unexpected pos" not in line and "RuntimeError" not in line
        assert not list(out.rglob("*.tmp"))
        assert not json.loads((out / "run.json").read_text())["finished"]


# ---- row 10: mismatch lines name the real difference -----------------------------------------------------
def test_model_mismatch_line_shows_where_two_random_init_ids_differ():
    from clt_pipe.analyze.inputs import check_clt_matches_store

    trained = {"name": "tiny", "weights_sha256": "random-init-0123456789abcdef", "n_layers": 2, "d_model": 8}
    held = dict(trained, weights_sha256="random-init-fedcba9876543210")
    store = SimpleNamespace(model=held, n_layers=2, d_model=8)
    clt = SimpleNamespace(spec=SimpleNamespace(n_layers=2, d_model=8))
    with pytest.raises(CltPipeError) as e:
        check_clt_matches_store(store, clt, {"store": {"model": trained}})
    assert "random-init-01234567" in str(e.value) and "random-init-fedcba98" in str(e.value)


def test_distinct_prefix_keeps_short_ids_short():
    from clt_pipe.analyze.inputs import distinct_prefix

    a, b = "ab" * 32, "ba" * 32
    assert distinct_prefix(a, b) == a[:12]  # sha256 hex ids differ early: 12 characters as before
    assert distinct_prefix("random-init-aaaa1111", "random-init-aaaa2222") == "random-init-aaaa1111"
