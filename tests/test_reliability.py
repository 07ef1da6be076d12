"""Never train on bad bytes (issue #15): every read is checked, every failure is one line naming its cause.

Fault injection on small synthetic stores (byte flips, deleted/truncated chunks, damaged commit records and
finalised arrays/files), plus the CLI error paths (URLs, --out, --pretrained, full disk, concurrent harvests).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clt_pipe.errors import CheckpointError, StoreError
from clt_pipe.store import format as F
from clt_pipe.store.inspect import repair_store, store_info, verify_store
from clt_pipe.store.reader import ActivationStore
from clt_pipe.store.zarrio import chunk_key
from clt_pipe.testing.synthstore import RandomRows, write_store
from tests.conftest import assert_one_line_error, moto_s3, run_cli

T, L, D = 4, 2, 8
IMAGES_PER_CHUNK = 16
CHUNK_MB = IMAGES_PER_CHUNK * T * L * D * 2 / 2**20


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """Two complete stores (uncompressed and blosc): 64 images, 4 chunks of 16 images, 2 shards."""
    root = tmp_path_factory.mktemp("pristine")
    out = {}
    for codec in ("none", "blosc-lz4-shuffle"):
        url = root / f"{codec}.zarr"
        write_store(str(url), 64, T, L, D, RandomRows(T, L, D, seed=0), compressor=codec, chunk_mb=CHUNK_MB,
                    chunks_per_shard=2)
        out[codec] = url
    return out


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    dst = tmp_path / "s.zarr"
    shutil.copytree(pristine["none"], dst)
    return dst


@pytest.fixture
def blosc_store(pristine, tmp_path) -> Path:
    dst = tmp_path / "b.zarr"
    shutil.copytree(pristine["blosc-lz4-shuffle"], dst)
    return dst


def chunk_file(url: Path, name: str, chunk: int) -> Path:
    s = ActivationStore(str(url), require_complete=False)
    return url / chunk_key(s.array(name), chunk)


def flip(path: Path, at: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def fit_args(url, out) -> list[str]:
    return ["fit", "--store", str(url), "--out", str(out), "--n-features", "16", "--k", "2", "--steps", "3",
            "--batch-size", "32", "--shuffle-chunks", "2", "--read-threads", "1", "--device", "cpu",
            "--warmup-steps", "1", "--dead-tokens", "100"]


# ---- chunks: flipped, missing, undecodable -------------------------------------------------------------
def test_flipped_activation_chunk_stops_every_reader(store, capsys, monkeypatch, tmp_path):
    flip(chunk_file(store, F.MLP_IN, 3))
    s = ActivationStore(str(store))
    with pytest.raises(StoreError,
                       match=r"chunk 3 of mlp_in \(shard 1\) does not match its commit checksum.*store repair"):
        s.read_chunk(3)
    s.read_chunk(0)  # the good chunks still read
    from clt_pipe.analyze.stream import iter_chunks

    with pytest.raises(StoreError, match="chunk 3 of mlp_in"):
        list(iter_chunks(s, torch.device("cpu"), read_threads=1))
    from clt_pipe.store.loader import ChunkLoader

    loader = ChunkLoader(s, 32, seed=0, shuffle_chunks=4, read_threads=1)
    try:
        with pytest.raises(StoreError, match="chunk 3 of mlp_in"):
            for _ in zip(range(20), loader):
                pass
    finally:
        loader.close()
    # explicitly off: reads what is there (verify's own path, and users who ask for it)
    ActivationStore(str(store), check_reads=False).read_chunk(3)
    for c in range(3):  # fit reads a few chunks in 3 steps (and holds some out): damage every one
        flip(chunk_file(store, F.MLP_IN, c))
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, tmp_path / "run"))
    assert_one_line_error(code, err, "of mlp_in (shard", "does not match its commit checksum", "store repair")


def test_flipped_mlp_out_chunk_is_named(store):
    flip(chunk_file(store, F.MLP_OUT, 1))
    with pytest.raises(StoreError, match=r"chunk 1 of mlp_out \(shard 0\)"):
        ActivationStore(str(store)).read_chunk(1)


def test_deleted_chunk_is_refused_not_read_as_fill_values(store, capsys, monkeypatch, tmp_path):
    chunk_file(store, F.MLP_IN, 2).unlink()
    with pytest.raises(StoreError, match=r"chunk 2 of mlp_in \(shard 1\) is missing"):
        ActivationStore(str(store)).read_chunk(2)
    for c in (0, 1, 3):
        chunk_file(store, F.MLP_IN, c).unlink()
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, tmp_path / "run"))
    assert_one_line_error(code, err, "of mlp_in (shard", "missing")


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_undecodable_chunk_is_one_line(blosc_store, damage, capsys, monkeypatch, tmp_path):
    for c in range(4):
        path = chunk_file(blosc_store, F.MLP_IN, c)
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[:40])
        else:
            flip(path, at=5)  # blosc header: the decoded size
    # blosc catches some damage itself (does not decode), some only the checksum sees (random data is stored
    # uncompressed by blosc, so a cut can still "decode"): either way one line naming the chunk
    with pytest.raises(StoreError, match=r"chunk 1 of mlp_in \(shard 0\) (does not decode|does not match)"):
        ActivationStore(str(blosc_store)).read_chunk(1)
    code, _, err = run_cli(capsys, monkeypatch, fit_args(blosc_store, tmp_path / "run"))
    assert_one_line_error(code, err, "of mlp_in (shard", "store repair")


@pytest.mark.parametrize("name", [F.LABELS, F.RESID_FINAL, F.TOKEN_INDEX])
def test_flipped_per_image_rows_are_refused(store, name):
    path = chunk_file(store, name, 2)
    flip(path, at=-1)
    s = ActivationStore(str(store))
    # zstd (the per-image codec) notices most flips itself; a flip it misses fails the shard's checksum
    with pytest.raises(StoreError, match=rf"(chunk 2 of {name}|{name} rows 32-64) \(shard 1\)"):
        s.per_image(name)
    assert verify_store(str(store))["bad_shards"] == [1]


def test_corrupt_array_metadata_is_one_line(store, capsys, monkeypatch, tmp_path):
    (store / F.MLP_IN / "zarr.json").write_bytes(b"\x00garbage{")
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, tmp_path / "run"))
    assert_one_line_error(code, err, "mlp_in")
    code, _, err = run_cli(capsys, monkeypatch, ["store", "verify", str(store)])
    assert_one_line_error(code, err)
    assert "metadata of array mlp_in is unreadable" in err


# ---- commit records ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_missing_or_unreadable_commit_record_makes_the_store_incomplete(store, damage, capsys, monkeypatch,
                                                                        tmp_path):
    rec = store / F.shard_commit_name(1)
    if damage == "delete":
        rec.unlink()
    else:
        rec.write_bytes(b"\xff\xfe not json")
    with pytest.raises(StoreError, match=r"incomplete.*shard\(s\) \[1\].*store repair"):
        ActivationStore(str(store))
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, tmp_path / "run"))
    assert_one_line_error(code, err, "incomplete", "shard")
    report = verify_store(str(store))
    assert not report["complete"] and 1 in report["bad_shards"]
    assert "INCOMPLETE" in store_info(str(store))["status"]


# ---- finalised arrays and files (COMPLETE.json checksums) ----------------------------------------------
@pytest.mark.parametrize("target,read", [
    ("stats/mean_in", lambda s: s.stats()),
    ("head/proj", lambda s: s.head()),
    ("text_classifier/single", lambda s: s.text_classifier("single")),
])
@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_finalised_arrays_are_checksummed(store, target, read, damage):
    s0 = ActivationStore(str(store))
    path = store / chunk_key(s0.array(target), 0)
    if damage == "flip":
        flip(path, at=-3)
    else:
        shutil.rmtree(store / target.split("/")[0]) if target.startswith("stats") else path.unlink()
    with pytest.raises(StoreError, match=target.split("/")[0]):
        read(ActivationStore(str(store)))
    report = verify_store(str(store))
    assert -1 in report["bad_shards"] and any(target.split("/")[0] in p for _, p in report["problems"])


def test_flipped_images_parquet_is_detected(store):
    flip(store / F.IMAGES_PARQUET, at=40)
    report = verify_store(str(store))
    assert any(F.IMAGES_PARQUET in p for _, p in report["problems"])
    with pytest.raises(StoreError, match="images.parquet does not match"):
        ActivationStore(str(store)).images()


def test_store_without_the_new_checksums_reads_as_before_with_a_note(store):
    done = json.loads((store / F.COMPLETE_FILE).read_text())
    done.pop("checksums")
    done.pop("record_crc32c")  # an older writer wrote neither
    (store / F.COMPLETE_FILE).write_text(json.dumps(done))
    s = ActivationStore(str(store))
    assert s.stats()["mean_in"].shape == (L, D) and s.images().num_rows == 64
    assert "written before" in store_info(str(store))["checksums"]
    assert not verify_store(str(store))["bad_shards"]


def test_store_info_says_new_stores_checksum_everything(store):
    assert store_info(str(store))["checksums"] == "every named array and file"
    done = json.loads((store / F.COMPLETE_FILE).read_text())
    names = set(done["checksums"]["arrays"])
    assert {"stats/mean_in", "stats/var_out", "head/proj", "head/ln_post_weight", "text_classifier/single",
            "stats/shard_moments_in"} <= names
    assert set(done["checksums"]["files"]) == {F.IMAGES_PARQUET}


def test_repair_drops_only_the_bad_shards(store):
    flip(chunk_file(store, F.MLP_IN, 3))
    out = repair_store(str(store))
    assert out["dropped_shards"] == [1]
    assert not (store / F.shard_commit_name(1)).exists() and (store / F.shard_commit_name(0)).exists()
    assert not (store / F.COMPLETE_FILE).exists()
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(str(store))


# ---- exported CLT ---------------------------------------------------------------------------------------
def test_flipped_exported_clt_is_refused(tmp_path):
    from clt_pipe.clt.export import load_clt, save_clt
    from clt_pipe.clt.model import CrossLayerTranscoder
    from clt_pipe.clt.spec import CLTSpec

    model = CrossLayerTranscoder(CLTSpec(n_layers=2, d_model=8, n_features=16, sparsifier="relu_topk", k=2))
    save_clt(model, tmp_path / "clt")
    load_clt(tmp_path / "clt")
    meta = json.loads((tmp_path / "clt" / "clt.json").read_text())
    assert set(meta["sha256"]) == {"W_enc_0.safetensors", "W_dec_0.safetensors", "W_enc_1.safetensors",
                                   "W_dec_1.safetensors"}
    flip(tmp_path / "clt" / "W_dec_1.safetensors", at=-5)  # inside the tensor data: still parses
    with pytest.raises(CheckpointError, match="W_dec_1.safetensors: does not match its sha256"):
        load_clt(tmp_path / "clt")


# ---- datasets -----------------------------------------------------------------------------------------
def test_imagefolder_missing_split_is_refused(tmp_path):
    from clt_pipe.datasets.base import DatasetError
    from clt_pipe.datasets.imagefolder import ImageFolderDataset
    from clt_pipe.testing.fakedata import make_fake_imagefolder

    root = make_fake_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=2)["root"]
    (root / "train").mkdir()
    for d in ("a", "b"):
        shutil.move(str(root / d), str(root / "train" / d))
    assert ImageFolderDataset(root, "train").class_names == ["a", "b"]
    with pytest.raises(DatasetError, match="no 'val' split folder.*train"):
        ImageFolderDataset(root, "val")


@pytest.mark.parametrize("bad", [150, -7])
def test_cifar_label_outside_the_classes_is_refused(tmp_path, bad):
    from clt_pipe.datasets.base import DatasetError
    from clt_pipe.datasets.cifar100 import Cifar100Dataset
    from clt_pipe.testing.fakedata import make_fake_cifar100

    info = make_fake_cifar100(tmp_path, n_train=8, n_test=4)
    path = info["folder"] / "train"
    d = pickle.loads(path.read_bytes())
    d[b"fine_labels"][5] = bad
    path.write_bytes(pickle.dumps(d))
    with pytest.raises(DatasetError, match=rf"train: label {bad} at index 5 is outside the 100 classes"):
        Cifar100Dataset(tmp_path, "train")
    Cifar100Dataset(tmp_path, "test")


# ---- CLI error paths ----------------------------------------------------------------------------------
def test_unknown_url_scheme_is_one_line(capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, ["store", "info", "foo://bucket/x.zarr"])
    assert_one_line_error(code, err, "foo://bucket/x.zarr", "unsupported store url")


def test_fit_out_that_is_a_file_or_read_only(store, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, tmp_path / "afile"))
    assert_one_line_error(code, err, "is a file")
    code, _, err = run_cli(capsys, monkeypatch, ["analyze", "--store", str(store), "--clt", str(tmp_path),
                                                 "--out", str(tmp_path / "afile")])
    assert_one_line_error(code, err, "is a file")
    # root ignores permission bits: stand in for a read-only mount at the file-system call
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, ro / "run"))
    assert_one_line_error(code, err, "read-only file system")


def test_full_disk_during_fit_checkpoint_is_one_line_and_leaves_no_temp(store, tmp_path, capsys, monkeypatch):
    def full(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, out))
    assert_one_line_error(code, err, "disk full", "checkpoint")
    assert not list(out.rglob("*.tmp"))


def test_corrupt_run_json_on_resume_is_one_line(store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, out))
    assert code == 0, err
    (out / "run.json").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run_cli(capsys, monkeypatch, fit_args(store, out) + ["--resume"])
    assert_one_line_error(code, err, "run.json")


def test_garbage_pretrained_file_is_one_line(tmp_path, tiny_model_config, capsys, monkeypatch):
    from clt_pipe.testing.fakedata import make_fake_imagefolder

    data = make_fake_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=2)["root"]
    junk = tmp_path / "weights.pt"
    junk.write_bytes(os.urandom(4096))
    code, _, err = run_cli(capsys, monkeypatch, [
        "harvest", "--model", str(tiny_model_config), "--pretrained", str(junk), "--dataset", "imagefolder",
        "--data-root", str(data), "--store", str(tmp_path / "s.zarr"), "--device", "cpu"])
    assert_one_line_error(code, err, "weights.pt")


# ---- concurrent harvests --------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from clt_pipe.store.location import StoreLocation
from clt_pipe.store import lock
held = lock.acquire(StoreLocation(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_second_harvest_of_a_locked_store_is_refused_in_one_line(tmp_path):
    from clt_pipe.store.writer import StoreWriter
    from clt_pipe.testing.synthstore import synthetic_meta

    url = tmp_path / "new.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(url)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        meta = synthetic_meta(64, T, L, D, chunk_mb=CHUNK_MB, chunks_per_shard=2)
        with pytest.raises(StoreError, match=rf"another harvest is writing .*new.zarr \(pid {holder.pid} on"):
            StoreWriter.open(str(url), meta)
        assert not (url / "zarr.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # a killed holder's lock goes with it: the next harvest proceeds (SIGKILL + resume keeps working)
    w = StoreWriter.open(str(url), meta)
    assert (url / "zarr.json").exists()
    w.release_lock()


def test_two_identical_harvests_at_once(tmp_path, tiny_model_config, warm_cli):
    from clt_pipe.testing.fakedata import make_fake_imagefolder

    data = make_fake_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=6)["root"]
    url = tmp_path / "same.zarr"
    args = ["harvest", "--model", str(tiny_model_config), "--pretrained", "none", "--dataset", "imagefolder",
            "--data-root", str(data), "--store", str(url), "--chunk-mb", "0.02", "--chunks-per-shard", "1",
            "--batch-size", "4", "--template-sets", "single", "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = [warm_cli(args, tmp_path, env=env) for _ in range(2)]  # two real processes, started warm
    results = [(p.wait(timeout=600), p.stderr()) for p in procs]
    for code, err in results:
        assert "Traceback" not in err, err
        if code != 0:
            assert code == 2 and "another harvest is writing" in err, err
    assert any(code == 0 for code, _ in results)
    report = verify_store(str(url))
    assert report["complete"] and not report["bad_shards"]


# ---- S3 (moto server, like tests/test_s3.py) --------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    with moto_s3("rel-bucket") as fs:
        yield fs


def test_s3_prefix_with_other_objects_is_refused(s3):
    from clt_pipe.store.writer import StoreWriter
    from clt_pipe.testing.synthstore import synthetic_meta

    s3.pipe_file("rel-bucket/shared/notes.txt", b"keep me")
    meta = synthetic_meta(64, T, L, D, chunk_mb=CHUNK_MB, chunks_per_shard=2)
    with pytest.raises(StoreError, match="exists, is not empty and is not a clt-pipe store"):
        StoreWriter.open("s3://rel-bucket/shared", meta)
    assert s3.cat_file("rel-bucket/shared/notes.txt") == b"keep me"
    assert not s3.exists("rel-bucket/shared/zarr.json") and not s3.exists("rel-bucket/shared/harvest.lock")


def test_s3_lease_refuses_a_live_holder_and_takes_over_a_stale_one(s3):
    from clt_pipe.store import lock
    from clt_pipe.store.location import StoreLocation

    loc = StoreLocation("s3://rel-bucket/leased.zarr")
    live = {"host": "other-host", "pid": 1, "since": "then", "token": "x", "expires": time.time() + 600}
    s3.pipe_file("rel-bucket/leased.zarr/harvest.lock", json.dumps(live).encode())
    with pytest.raises(StoreError, match="another harvest is writing .*pid 1 on other-host"):
        lock.acquire(loc)
    s3.pipe_file("rel-bucket/leased.zarr/harvest.lock", json.dumps(dict(live, expires=time.time() - 1)).encode())
    held = lock.acquire(loc)
    assert json.loads(s3.cat_file("rel-bucket/leased.zarr/harvest.lock"))["pid"] == os.getpid()
    held.release()
    assert not s3.exists("rel-bucket/leased.zarr/harvest.lock")


def test_s3_missing_bucket_and_bad_credentials_name_the_cause(s3, capsys, monkeypatch, pristine):
    from clt_pipe.store.writer import StoreWriter
    from clt_pipe.testing.synthstore import synthetic_meta

    meta = synthetic_meta(64, T, L, D, chunk_mb=CHUNK_MB, chunks_per_shard=2)
    with pytest.raises(StoreError, match="bucket does not exist") as e:
        StoreWriter.open("s3://no-such-bucket/x.zarr", meta)
    assert "free space" not in str(e.value)
    s3.put(str(pristine["none"]), "rel-bucket/copy.zarr", recursive=True)
    code, _, _ = run_cli(capsys, monkeypatch, ["store", "verify", "s3://rel-bucket/copy.zarr"])
    assert code == 0
    # moto accepts any key, so the credential failure here is "none found" (botocore's NoCredentialsError)
    for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    _verify_names_the_credentials(capsys, monkeypatch, "s3://rel-bucket/copy.zarr")


def _verify_names_the_credentials(capsys, monkeypatch, url: str) -> None:
    """``store verify url`` under the credentials the environment now has fails in one line about them."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached file system would keep the old credentials
    try:
        code, _, err = run_cli(capsys, monkeypatch, ["store", "verify", url])
        assert_one_line_error(code, err, url, "credentials")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def _s3_failure(code: str, status: int, **error):
    """What s3fs raises for a server's error response (its own translation of botocore's ClientError)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response = {"Error": {"Code": code, **error}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, "PutObject"))


# Ceph radosgw's answers (captured against radosgw 16.2 on loopback): no Message, no Condition.
RADOSGW = {"missing bucket": ("NoSuchBucket", 404, {"Message": None, "BucketName": "no-such-bucket"}),
           "wrong secret": ("SignatureDoesNotMatch", 403, {"Message": None}),
           "unknown key": ("InvalidAccessKeyId", 403, {"Message": None}),
           "lease exists": ("PreconditionFailed", 412, {"Message": None, "BucketName": "b"}),
           "head refused": ("403", 403, {"Message": "Forbidden"})}


def test_object_store_errors_are_read_from_codes_not_wording():
    from clt_pipe.errors import describe_io_error, is_precondition_failed

    said = {case: describe_io_error(_s3_failure(c, st, **err)) for case, (c, st, err) in RADOSGW.items()}
    assert said["missing bucket"].startswith("bucket does not exist")
    assert said["wrong secret"] == "credentials rejected by the server (SignatureDoesNotMatch)"
    assert said["unknown key"] == "credentials rejected by the server (InvalidAccessKeyId)"
    assert said["head refused"] == "access denied by the server: wrong credentials or no permission (403)"
    assert "None" not in said["missing bucket"]
    # the conditional create's refusal, as radosgw words it (s3fs: OSError) and as AWS/moto do (FileExistsError)
    assert is_precondition_failed(_s3_failure(*RADOSGW["lease exists"][:2], **RADOSGW["lease exists"][2]))
    aws = _s3_failure("PreconditionFailed", 412, Message="At least one of the pre-conditions you specified did not "
                      "hold", Condition="If-None-Match")
    assert isinstance(aws, FileExistsError) and is_precondition_failed(aws)
    assert not is_precondition_failed(_s3_failure("NoSuchBucket", 404, Message=None))
    assert not is_precondition_failed(OSError(5, "disk on fire"))


@pytest.mark.skipif(not os.environ.get("CLT_PIPE_TEST_S3_ENDPOINT"), reason="moto accepts any secret")
def test_s3_wrong_secret_names_the_credentials(s3, capsys, monkeypatch, pristine):
    s3.put(str(pristine["none"]), "rel-bucket/secret.zarr", recursive=True)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    _verify_names_the_credentials(capsys, monkeypatch, "s3://rel-bucket/secret.zarr")


# ---- repair, end to end --------------------------------------------------------------------------------
def test_repair_then_the_same_harvest_rewrites_exactly_the_bad_shards(tmp_path, tiny_model_config, capsys,
                                                                      monkeypatch):
    from clt_pipe.testing.fakedata import make_fake_imagefolder

    data = make_fake_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=6)["root"]
    url = tmp_path / "h.zarr"
    harvest = ["harvest", "--model", str(tiny_model_config), "--pretrained", "none", "--dataset", "imagefolder",
               "--data-root", str(data), "--store", str(url), "--chunk-mb", "0.02", "--chunks-per-shard", "1",
               "--batch-size", "4", "--template-sets", "single", "--device", "cpu"]
    code, _, err = run_cli(capsys, monkeypatch, harvest)
    assert code == 0, err
    s = ActivationStore(str(url))
    assert s.layout.n_shards >= 3
    before = {n: s.array(n)[:] for n in (F.MLP_IN, F.MLP_OUT, F.LABELS)}
    flip(chunk_file(url, F.MLP_OUT, 1))
    (url / F.IMAGES_PARQUET).write_bytes(b"junk")
    untouched = (url / F.shard_commit_name(0)).stat().st_mtime_ns
    code, _, err = run_cli(capsys, monkeypatch, ["store", "verify", str(url)])
    assert_one_line_error(code, err, "bad shard")
    code, out, err = run_cli(capsys, monkeypatch, ["store", "repair", str(url)])
    assert code == 0 and "dropped the commits of shard(s) 1" in out, out + err
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(str(url))
    code, _, err = run_cli(capsys, monkeypatch, harvest)
    assert code == 0 and "resuming" in err, err
    assert not verify_store(str(url))["bad_shards"]
    s = ActivationStore(str(url))
    for n, arr in before.items():
        assert np.array_equal(s.array(n)[:], arr, equal_nan=True), n
    assert s.images().num_rows == s.layout.n_images
    assert (url / F.shard_commit_name(0)).stat().st_mtime_ns == untouched


def test_local_folder_with_other_files_is_refused_and_left_as_it_was(tmp_path):
    from clt_pipe.store.writer import StoreWriter
    from clt_pipe.testing.synthstore import synthetic_meta

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    meta = synthetic_meta(64, T, L, D, chunk_mb=CHUNK_MB, chunks_per_shard=2)
    with pytest.raises(StoreError, match="exists, is not empty and is not a clt-pipe store"):
        StoreWriter.open(str(folder), meta)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
