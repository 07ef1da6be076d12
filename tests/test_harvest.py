"""Harvest acceptance tests on the tiny open_clip CLIP (6 layers, width 64, 17 tokens).

Weights are a seeded random init saved to a checkpoint file, so every harvest (in-process or in a
subprocess) and every reference forward pass in these tests uses the same model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import zarr
from clt_pipe.testing.fakedata import make_fake_cifar100, make_fake_imagefolder
from PIL import Image

from clt_pipe.config import HarvestConfig, build
from clt_pipe.errors import ConfigError, StoreError
from clt_pipe.harvest.run import run_harvest
from clt_pipe.store.reader import ActivationStore
from tests.conftest import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"
T_ALL = 17  # 1 CLS + 4x4 patches
L, D, E = 6, 64, 64


# ------------------------------------------------------------------------------------------ helpers


def _quiet(*_a, **_k):
    pass


def harvest(store, folder, ckpt, **kw) -> dict:
    """In-process harvest with the test defaults (12 images -> 2 images/chunk, 2 chunks/shard, 3 shards)."""
    base = dict(model=str(TINY), pretrained=str(ckpt), dataset="imagefolder", data_root=str(folder),
                store=str(store), chunk_mb=0.02, chunks_per_shard=2, batch_size=4, template_sets=["single"],
                tokens="all", dtype="fp16")
    base.update(kw)
    return run_harvest(build(HarvestConfig, base), log=_quiet)


def cli_args(store, folder, ckpt, *extra) -> list[str]:
    return ["harvest", "--model", str(TINY), "--pretrained", str(ckpt), "--dataset", "imagefolder",
            "--data-root", str(folder), "--store", str(store), "--chunk-mb", "0.02", "--chunks-per-shard", "2",
            "--batch-size", "4", "--template-sets", "single", *extra]


def snapshot(path: Path) -> dict:
    """relative path -> (sha256 of the bytes, mtime_ns) of every file under ``path`` (not the harvest lock,
    which every harvest takes, refused or not: it holds no data)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.name != "harvest.lock":
            out[p.relative_to(path).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def all_arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    return {name: arr[...] for name, arr in group.members(max_depth=None) if isinstance(arr, zarr.Array)}


def f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def bf16_decode(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def reference_model(ckpt):
    """The harvested model loaded with open_clip only (no clt_pipe)."""
    open_clip.add_model_config(str(TINY))
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(ckpt))
    return model.eval(), preprocess


def direct_capture(model, preprocess, paths, batch: int = 4) -> dict[str, np.ndarray]:
    """fp32 ln_2 outputs / mlp outputs [n, 17, L, d], CLS residual into ln_post, embedding; own hooks."""
    vis = model.visual
    out = {"mlp_in": [], "mlp_out": [], "resid_final": [], "embedding": []}
    for b0 in range(0, len(paths), batch):
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[b0:b0 + batch]])
        got: dict = {"in": {}, "out": {}}
        hs = []
        for li, blk in enumerate(vis.transformer.resblocks):
            hs.append(blk.ln_2.register_forward_hook(lambda m, i, o, li=li: got["in"].__setitem__(li, o.clone())))
            hs.append(blk.mlp.register_forward_hook(lambda m, i, o, li=li: got["out"].__setitem__(li, o.clone())))
        hs.append(vis.ln_post.register_forward_pre_hook(lambda m, i: got.__setitem__("rf", i[0].clone())))
        with torch.no_grad():
            emb = model.encode_image(x)
        for h in hs:
            h.remove()
        out["mlp_in"].append(torch.stack([got["in"][li] for li in range(L)], 2).numpy())
        out["mlp_out"].append(torch.stack([got["out"][li] for li in range(L)], 2).numpy())
        rf = got["rf"]
        out["resid_final"].append((rf[:, 0] if rf.dim() == 3 else rf).numpy())
        out["embedding"].append(emb.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    open_clip.add_model_config(str(TINY))
    torch.manual_seed(1234)
    model = open_clip.create_model("tiny-clip")
    path = tmp_path_factory.mktemp("weights") / "tiny-seeded.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    return make_fake_imagefolder(tmp_path_factory.mktemp("imgs"), classes=("cat", "dog", "frog"), per_class=4)


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, folder, ckpt) -> Path:
    store = tmp_path_factory.mktemp("stores") / "base.zarr"
    summary = harvest(store, folder["root"], ckpt)
    assert summary["n_shards"] == 3 and summary["n_images"] == 12
    return store


@pytest.fixture(scope="module")
def reference(folder, ckpt) -> dict:
    model, preprocess = reference_model(ckpt)
    return direct_capture(model, preprocess, folder["paths"])


# ------------------------------------------------------------------------------------ cached pieces reproduce the model


def test_cls_residual_is_sum_of_cached_pieces(base_store, folder, ckpt):
    """resid_final(CLS) == ln_pre(x)[CLS] + sum_l attn_l[CLS] + sum_l stored mlp_out_l[CLS]."""
    model, preprocess = reference_model(ckpt)
    vis = model.visual
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in folder["paths"]])
    pieces: dict = {"attn": {}}
    hs = [vis.ln_pre.register_forward_hook(lambda m, i, o: pieces.__setitem__("pre", o.clone()))]
    for li, blk in enumerate(vis.transformer.resblocks):
        hs.append(blk.ls_1.register_forward_hook(lambda m, i, o, li=li: pieces["attn"].__setitem__(li, o.clone())))
    with torch.no_grad():
        model.encode_image(x)
    for h in hs:
        h.remove()
    g = zarr.open_group(str(base_store), mode="r")
    tok = g["token_index"][:]
    assert (tok[:, 0] == 0).all()
    mlp_out = f16(g["mlp_out"][:]).reshape(12, T_ALL, L, D)
    cls_mlp = mlp_out[:, 0].astype(np.float64).sum(1)  # [12, d]
    pre = pieces["pre"][:, 0].double().numpy()
    attn = sum(pieces["attn"][li][:, 0].double() for li in range(L)).numpy()
    resid = g["resid_final"][:].astype(np.float64)
    tol = L * np.abs(mlp_out[:, 0]).max() * 2.0**-10 + 1e-5
    np.testing.assert_allclose(pre + attn + cls_mlp, resid, rtol=0, atol=tol)
    # the MLP term matters: leaving it out is far outside that tolerance
    assert np.abs(pre + attn - resid).max() > 20 * tol


def test_substituting_stored_mlp_outputs_reproduces_embedding(base_store, folder, ckpt):
    model, preprocess = reference_model(ckpt)
    vis = model.visual
    g = zarr.open_group(str(base_store), mode="r")
    assert (g["token_index"][:] == np.arange(T_ALL)).all()
    stored = torch.from_numpy(f16(g["mlp_out"][:]).reshape(12, T_ALL, L, D))
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in folder["paths"]])

    def run(replacement):
        hs = [blk.mlp.register_forward_hook(lambda m, i, o, li=li: replacement(li, o))
              for li, blk in enumerate(vis.transformer.resblocks)]
        try:
            with torch.no_grad():
                return model.encode_image(x).numpy()
        finally:
            for h in hs:
                h.remove()

    patched = run(lambda li, o: stored[:, :, li].to(o.dtype))
    emb = g["embedding"][:]
    scale = np.abs(emb).max()
    np.testing.assert_allclose(patched, emb, rtol=0, atol=2e-3 * scale)
    zeroed = run(lambda li, o: torch.zeros_like(o))
    assert np.abs(zeroed - emb).max() > 0.05 * scale  # the substitution is what makes it match
    # and the stored embedding is the model's unnormalised image embedding
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_image(x).numpy(), emb, rtol=1e-4, atol=1e-5 * scale)


def test_harvested_store_meta_round_trips_its_root_attributes(base_store):
    from clt_pipe.store.meta import StoreMeta

    stored = json.loads((base_store / "zarr.json").read_text())["attributes"]["clt_pipe_store"]
    meta = ActivationStore(str(base_store)).meta
    assert json.dumps(meta.to_dict()) == json.dumps(stored)  # same keys in the same order: same zarr.json bytes
    assert StoreMeta.from_dict(meta.to_dict()) == meta
    assert str(meta.tokens.policy) == stored["tokens"]["policy"] and meta.model.n_layers == L


# ------------------------------------------------------------------------------------------ plain zarr + pyarrow reader


def test_store_readable_with_zarr_and_pyarrow_only(base_store, folder, reference):
    # --- reading code below: zarr, pyarrow, numpy, json only (storage/FORMAT.md) ---
    import pyarrow.parquet as pq

    root = str(base_store)
    assert os.path.isfile(os.path.join(root, "COMPLETE.json"))
    g = zarr.open_group(root, mode="r")
    meta = g.attrs["clt_pipe_store"]
    for key in ("format_version", "fingerprint", "model", "preprocess", "dataset", "templates", "tokens",
                "activations", "layout", "created", "tool_version"):
        assert key in meta, key
    assert meta["format_version"] == 1
    lay = meta["layout"]
    n_img, T, nl, d = lay["n_images"], lay["tokens_per_image"], lay["n_layers"], lay["d_model"]
    assert (n_img, T, nl, d) == (12, T_ALL, L, D)
    assert meta["tokens"] == {"policy": "all", "k": 0, "tokens_per_image": T_ALL, "seed": 0}
    assert meta["activations"]["dtype"] == "fp16" and meta["activations"]["storage_dtype"] == "float16"
    assert meta["model"]["n_layers"] == nl and meta["model"]["d_model"] == d
    assert meta["dataset"]["class_names"] == ["cat", "dog", "frog"]
    n_shards = -(-n_img // (lay["images_per_chunk"] * lay["chunks_per_shard"]))
    commits = sorted(os.listdir(os.path.join(root, "commits")))
    assert commits == [f"shard-{s:06d}.json" for s in range(n_shards)]
    for s, name in enumerate(commits):
        with open(os.path.join(root, "commits", name)) as fh:
            rec = json.load(fh)
        assert rec["shard"] == s and rec["fingerprint"] == meta["fingerprint"]

    mlp_in, mlp_out = g["mlp_in"], g["mlp_out"]
    assert mlp_in.shape == mlp_out.shape == (n_img * T, nl, d)
    assert mlp_in.dtype == np.float16 and mlp_in.chunks == (lay["images_per_chunk"] * T, nl, d)
    assert g["resid_final"].shape == (n_img, d) and g["embedding"].shape == (n_img, meta["model"]["embed_dim"])
    assert g["token_index"].shape == (n_img, T) and g["labels"].shape == (n_img,)
    assert g["image_ok"][:].astype(bool).all()
    head = g["head"]
    assert head["proj"].shape == (d, meta["model"]["embed_dim"]) and head["ln_post_weight"].shape == (d,)
    assert g["text_classifier"]["single"].shape == (3, meta["model"]["embed_dim"])

    image = 7
    pos = g["token_index"][image]
    rows = slice(image * T, (image + 1) * T)
    got_in = mlp_in[rows].astype(np.float32)
    got_out = mlp_out[rows].astype(np.float32)

    table = pq.read_table(os.path.join(root, "images.parquet"))
    assert table.column_names == ["image", "row_start", "shard", "source", "label", "labels", "split", "ok", "error"]
    cols = table.to_pydict()
    # --- end of reading code ---

    np.testing.assert_array_equal(pos, np.arange(T_ALL))
    want_in, want_out = reference["mlp_in"][image][pos], reference["mlp_out"][image][pos]
    for got, want in ((got_in, want_in), (got_out, want_out)):
        np.testing.assert_allclose(got, want, rtol=2.0**-10, atol=1e-6)
    np.testing.assert_allclose(g["resid_final"][image], reference["resid_final"][image], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["embedding"][image], reference["embedding"][image], rtol=1e-4, atol=1e-5)

    assert cols["image"] == list(range(12))
    assert cols["row_start"] == [i * T for i in range(12)]
    assert cols["shard"] == [i // 4 for i in range(12)]
    assert cols["label"] == folder["labels"] and list(g["labels"][:]) == folder["labels"]
    assert cols["labels"] == [[lab] for lab in folder["labels"]]
    assert cols["source"] == [p.relative_to(folder["root"]).as_posix() for p in folder["paths"]]
    assert cols["split"] == ["train"] * 12 and cols["ok"] == [True] * 12 and cols["error"] == [None] * 12


# ------------------------------------------------------------------------------------------ statistics


def _check_stats(g: zarr.Group, ok: np.ndarray) -> None:
    T = g.attrs["clt_pipe_store"]["layout"]["tokens_per_image"]
    valid = np.repeat(ok, T)
    for side in ("in", "out"):
        rows = f16(g[f"mlp_{side}"][:]).astype(np.float64)[valid]
        assert np.isfinite(rows).all()
        np.testing.assert_allclose(g["stats"][f"mean_{side}"][:], rows.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g["stats"][f"var_{side}"][:], rows.var(0), rtol=1e-9, atol=1e-12)
    assert g["stats"].attrs["count"] == int(valid.sum())


def test_stats_equal_numpy_over_stored_rows(base_store):
    g = zarr.open_group(str(base_store), mode="r")
    _check_stats(g, np.ones(12, bool))
    assert g["stats"]["shard_count"][:].tolist() == [4 * T_ALL, 4 * T_ALL, 4 * T_ALL]


# ------------------------------------------------------------------------------------------ token policies, dtypes


@pytest.mark.parametrize("policy", ["cls", "patches", "cls+3"])
def test_token_policies(tmp_path, base_store, folder, ckpt, policy):
    harvest(tmp_path / "s.zarr", folder["root"], ckpt, tokens=policy)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    meta = g.attrs["clt_pipe_store"]
    tok = g["token_index"][:]
    T = {"cls": 1, "patches": 16, "cls+3": 4}[policy]
    assert tok.shape == (12, T) and meta["layout"]["tokens_per_image"] == T
    assert meta["tokens"]["policy"] == policy and meta["tokens"]["tokens_per_image"] == T
    if policy == "cls":
        assert (tok == 0).all()
    elif policy == "patches":
        assert (tok == np.arange(1, T_ALL)).all()
    else:
        assert meta["tokens"]["k"] == 3
        assert (tok[:, 0] == 0).all()
        p = tok[:, 1:]
        assert ((p >= 1) & (p < T_ALL)).all() and (np.diff(p, axis=1) > 0).all()  # sorted, distinct patches
        assert len({tuple(r) for r in p}) > 1  # drawn per image
    # the stored rows are exactly the "all" store's rows at those positions (same forward, same batches)
    base = zarr.open_group(str(base_store), mode="r")
    for name in ("mlp_in", "mlp_out"):
        full = base[name][:].reshape(12, T_ALL, L, D)
        want = np.stack([full[i, tok[i]] for i in range(12)]).reshape(12 * T, L, D)
        np.testing.assert_array_equal(g[name][:].view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(g["embedding"][:], base["embedding"][:])


def test_cls_plus_k_deterministic_per_seed(tmp_path, folder, ckpt):
    idx = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        harvest(tmp_path / f"{name}.zarr", folder["root"], ckpt, tokens="cls+5", seed=seed, batch_size=3,
                limit=6)
        idx[name] = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")["token_index"][:]
    assert idx["a"].shape == (6, 6) and (idx["a"][:, 0] == 0).all()
    np.testing.assert_array_equal(idx["a"], idx["b"])
    assert not np.array_equal(idx["a"], idx["c"])


def test_bf16_round_trip(tmp_path, base_store, folder, ckpt, reference):
    harvest(tmp_path / "bf.zarr", folder["root"], ckpt, dtype="bf16")
    g = zarr.open_group(str(tmp_path / "bf.zarr"), mode="r")
    meta = g.attrs["clt_pipe_store"]["activations"]
    assert meta["dtype"] == "bf16" and meta["storage_dtype"] == "uint16"
    arr = g["mlp_in"]
    assert arr.dtype == np.uint16 and int(arr.fill_value) == 0x7FC0
    assert np.isnan(bf16_decode(np.array([arr.fill_value], np.uint16)))[0]
    for name in ("mlp_in", "mlp_out"):
        bits = g[name][:]
        want = torch.from_numpy(reference[name].reshape(12 * T_ALL, L, D)).to(torch.bfloat16)
        want_bits = want.view(torch.int16).numpy().view(np.uint16)
        dec = bf16_decode(bits)
        # decoding is exact: re-encoding the decoded floats gives the stored bits back
        np.testing.assert_array_equal(
            torch.from_numpy(dec).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), bits)
        # and the stored bits are the reference values rounded to bf16 (allow 1 ulp for fp32 noise)
        diff = np.abs(bits.astype(np.int32) - want_bits.astype(np.int32))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        # agrees with the fp16 store within bf16 precision
        np.testing.assert_allclose(dec, f16(zarr.open_group(str(base_store), mode="r")[name][:]),
                                   rtol=2.0**-8, atol=1e-6)
    _check_stats(_BF16View(g), np.ones(12, bool))  # stats are over the decoded bf16 values


class _BF16View:
    """A zarr group whose mlp arrays read back decoded (so _check_stats applies to a bf16 store)."""

    def __init__(self, g):
        self.g = g
        self.attrs = g.attrs

    def __getitem__(self, name):
        if name in ("mlp_in", "mlp_out"):
            return _Decoded(self.g[name])
        return self.g[name]


class _Decoded:
    def __init__(self, arr):
        self.arr = arr

    def __getitem__(self, sl):
        return bf16_decode(self.arr[sl])


# ------------------------------------------------------------------------------------------ crash, kill, resume


def test_kill_mid_harvest_then_resume_equals_uninterrupted(tmp_path, ckpt, capsys, monkeypatch, warm_cli):
    data = make_fake_imagefolder(tmp_path / "data", classes=("a", "b", "c"), per_class=8)  # 24 images
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"

    def args(store):  # 1 image per chunk, 2 chunks per shard -> 12 shards; batches of 2
        return ["harvest", "--model", str(TINY), "--pretrained", str(ckpt), "--dataset", "imagefolder",
                "--data-root", str(data["root"]), "--store", str(store), "--chunk-mb", "0.01",
                "--chunks-per-shard", "2", "--batch-size", "2", "--template-sets", "single"]

    # a real process, started warm (see tests/warmcli.py), SIGKILLed after its first commit
    proc = warm_cli(args(killed), tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    commits = killed / "commits"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if commits.is_dir() and any(p.suffix == ".json" for p in commits.glob("shard-*.json")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"harvest ended before the kill: {proc.stderr()[-2000:]}"
        proc.kill()
    finally:
        proc.kill()
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    n_committed = len(list(commits.glob("shard-*.json")))
    assert 1 <= n_committed < 12
    assert not (killed / "COMPLETE.json").exists()

    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(str(killed))
    code, out, err = run_cli(capsys, monkeypatch, ["store", "info", str(killed), "--json"])
    assert code == 0
    info = json.loads(out)
    assert info["complete"] is False and info["shards_committed"] == f"{n_committed}/12"
    code, out, err = run_cli(capsys, monkeypatch, ["store", "verify", str(killed)])
    assert code != 0 and "INCOMPLETE" in out

    code, out, err = run_cli(capsys, monkeypatch, args(killed))  # the same command resumes
    assert code == 0, err
    assert f"resuming: {n_committed}/12 shards already committed" in err
    code, out, err = run_cli(capsys, monkeypatch, args(clean))
    assert code == 0, err

    ActivationStore(str(killed))  # complete now
    ga, gb = zarr.open_group(str(killed), mode="r"), zarr.open_group(str(clean), mode="r")
    a, b = all_arrays(ga), all_arrays(gb)
    assert sorted(a) == sorted(b) and {"mlp_in", "mlp_out", "stats/mean_in", "text_classifier/single"} <= set(a)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs after resume"
    ma, mb = ga.attrs["clt_pipe_store"], gb.attrs["clt_pipe_store"]
    assert ma["fingerprint"] == mb["fingerprint"]
    import pyarrow.parquet as pq

    assert pq.read_table(killed / "images.parquet").equals(pq.read_table(clean / "images.parquet"))
    for s in range(12):
        ra = json.loads((killed / "commits" / f"shard-{s:06d}.json").read_text())
        rb = json.loads((clean / "commits" / f"shard-{s:06d}.json").read_text())
        ra.pop("committed"), rb.pop("committed")
        assert ra == rb
    assert not list(killed.rglob("*.tmp"))
    code, out, err = run_cli(capsys, monkeypatch, ["store", "verify", str(killed)])
    assert code == 0 and "complete" in out


def test_disk_full_is_a_store_error_and_rerun_completes(tmp_path, base_store, folder, ckpt, monkeypatch):
    store = tmp_path / "full.zarr"
    real_set = zarr.storage.LocalStore.set
    calls = {"n": 0, "failed": None}

    async def failing_set(self, key, value, *a, **k):
        # The first chunk of shard 1 (by key: shard 0's commit and shard 1's writes overlap, so call order varies)
        if key == "mlp_in/c/2/0/0":
            calls["failed"] = key
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value, *a, **k)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    with pytest.raises(StoreError, match="disk full"):
        harvest(store, folder["root"], ckpt)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    assert calls["failed"] == "mlp_in/c/2/0/0"
    committed = sorted(p.name for p in (store / "commits").glob("*.json"))
    assert committed == ["shard-000000.json"]  # shard 1 (in progress) and 2 are not committed
    assert not (store / "COMPLETE.json").exists()
    with pytest.raises(StoreError):
        ActivationStore(str(store))

    summary = harvest(store, folder["root"], ckpt)
    assert summary["resumed_shards"] == 1
    assert_same_arrays(store, base_store)


def test_write_threads_do_not_change_the_store(tmp_path, base_store, folder, ckpt):
    """Chunks compress and land in any order on the writer pool; the store must not depend on it."""
    for threads in (1, 4):
        store = tmp_path / f"t{threads}.zarr"
        harvest(store, folder["root"], ckpt, write_threads=threads)
        assert_same_arrays(store, base_store)
        for shard in range(3):
            name = f"commits/shard-{shard:06d}.json"
            a, b = json.loads((store / name).read_text()), json.loads((base_store / name).read_text())
            assert a["chunk_crc32c"] == b["chunk_crc32c"] and len(a["chunk_crc32c"]) == 2


def test_failed_chunk_write_in_the_pool_blocks_the_commit(tmp_path, folder, ckpt, monkeypatch):
    """An error inside a pool thread (not an OSError) must surface and leave its shard uncommitted."""
    from clt_pipe.store.writer import ShardWriter

    real = ShardWriter._write_chunks

    def flaky(self, group):
        if 5 in [c for c, _ in group]:  # shard 2's second chunk
            raise RuntimeError("codec exploded")
        return real(self, group)

    monkeypatch.setattr(ShardWriter, "_write_chunks", flaky)
    store = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="codec exploded"):
        harvest(store, folder["root"], ckpt, write_threads=3)
    assert sorted(p.name for p in (store / "commits").glob("*.json")) == ["shard-000000.json", "shard-000001.json"]
    assert not (store / "COMPLETE.json").exists()


def test_failed_chunk_keeps_failing_its_shard(tmp_path, monkeypatch):
    """A retried commit after a failed chunk must fail again, not commit a shard with a hole in it."""
    from clt_pipe.testing.synthstore import synthetic_meta

    from clt_pipe.store.writer import ShardWriter, StoreWriter

    T_, L_, D_ = 4, 2, 8
    meta = synthetic_meta(32, T_, L_, D_, dtype="fp16", compressor="none", chunk_mb=4 * T_ * L_ * D_ * 2 / 2**20,
                          chunks_per_shard=2)
    writer = StoreWriter.open(str(tmp_path / "s.zarr"), meta, write_threads=2)
    real = ShardWriter._write_chunks

    def flaky(self, group):
        if 0 in [c for c, _ in group]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, group)

    monkeypatch.setattr(ShardWriter, "_write_chunks", flaky)
    sw = writer.shard(0)
    n = len(writer.layout.shard_images(0))
    x = np.ones((n, T_, L_, D_), np.float16)
    try:
        sw.add(0, x, x, np.zeros((n, D_), np.float32), np.zeros((n, meta.model.embed_dim), np.float32),
               np.zeros(n, np.int32), np.tile(np.arange(T_, dtype=np.int16), (n, 1)), np.ones(n, np.uint8))
    except OSError:
        pass  # the failure may already surface at the next chunk's flush, if chunk 0 finished by then
    for _ in range(2):
        with pytest.raises(OSError, match="No space"):
            sw.commit()
    writer.close()
    assert not list((tmp_path / "s.zarr" / "commits").glob("*.json"))


def test_read_chunk_into_refuses_a_buffer_of_another_dtype(base_store):
    store = ActivationStore(str(base_store))
    rows = store.layout.rows_per_chunk
    shape = (rows, store.layout.n_layers, store.layout.d_model)
    with pytest.raises(TypeError, match="float16"):
        store.read_chunk_into(0, np.empty(shape, np.uint16), np.empty(shape, np.uint16))
    x, y = np.empty(shape, np.float16), np.empty(shape, np.float16)
    store.read_chunk_into(0, x, y)
    cx, cy = store.read_chunk(0)
    assert x.tobytes() == cx.tobytes() and y.tobytes() == cy.tobytes()


def assert_same_arrays(store, reference) -> None:
    """Every array of two stores bit for bit (NaN fill included)."""
    a, b = all_arrays(zarr.open_group(str(store), mode="r")), all_arrays(zarr.open_group(str(reference), mode="r"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_resume_rewrites_only_uncommitted_shards(tmp_path, base_store, folder, ckpt):
    store = tmp_path / "s.zarr"
    shutil.copytree(base_store, store)
    (store / "COMPLETE.json").unlink()
    (store / "commits" / "shard-000002.json").unlink()
    (store / "commits" / "shard-000002.json.0123abcd.tmp").write_text("{torn")
    chunk4 = store / "mlp_in" / "c" / "4" / "0" / "0"  # shard 2's first chunk: a torn write from the crash
    chunk4.write_bytes(b"torn")
    partial = store / "mlp_out" / "c" / "5" / "0" / "0.9f8e7d6c5b4a.partial"  # zarr's temp file of a killed write
    partial.write_bytes(b"half a chunk")
    before = snapshot(store)
    summary = harvest(store, folder["root"], ckpt)
    assert summary["resumed_shards"] == 2
    after = snapshot(store)
    for key in ("commits/shard-000000.json", "commits/shard-000001.json", "mlp_in/c/0/0/0", "mlp_out/c/3/0/0"):
        assert after[key] == before[key], key  # committed shards are not rewritten
    assert after["mlp_in/c/4/0/0"] != before["mlp_in/c/4/0/0"]
    assert not list((store / "commits").glob("*.tmp")) and not list(store.rglob("*.partial"))
    assert_same_arrays(store, base_store)


def test_resume_cleans_root_temp_files(tmp_path, base_store, folder, ckpt):
    store = tmp_path / "s.zarr"
    shutil.copytree(base_store, store)
    (store / "COMPLETE.json").unlink()
    (store / "images.parquet.0123abcd.tmp").write_bytes(b"torn")
    harvest(store, folder["root"], ckpt)
    assert not list(store.glob("*.tmp"))


def test_resume_after_kill_during_array_creation(tmp_path, base_store, folder, ckpt):
    store = tmp_path / "s.zarr"
    shutil.copytree(base_store, store)
    for p in ("COMPLETE.json", "images.parquet", "commits", "image_ok", "stats", "head", "text_classifier"):
        shutil.rmtree(store / p) if (store / p).is_dir() else (store / p).unlink()
    # What StoreWriter.open leaves when killed between creating the group and its last array.
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["clt_pipe_store"] = dict(g.attrs["clt_pipe_store"], initialised=False)
    harvest(store, folder["root"], ckpt)
    ActivationStore(str(store))


# ------------------------------------------------------------------------------------------ bad input


def test_dataset_root_missing_real_process(tmp_path, base_store, ckpt, warm_cli):
    before = snapshot(base_store)
    proc = warm_cli(cli_args(base_store, tmp_path / "nope", ckpt), tmp_path)
    assert_one_line_error(proc.wait(120), proc.stderr(), "does not exist", "nope")
    assert snapshot(base_store) == before


def test_cifar_missing_test_pickle(tmp_path, base_store, capsys, monkeypatch, ckpt):
    make_fake_cifar100(tmp_path / "c", n_train=4, n_test=2)
    (tmp_path / "c" / "cifar-100-python" / "test").unlink()
    before = snapshot(base_store)
    args = cli_args(base_store, tmp_path / "c", ckpt)
    args[args.index("imagefolder")] = "cifar100"
    code, _, err = run_cli(capsys, monkeypatch, [*args, "--split", "test"])
    assert_one_line_error(code, err, "missing", "test")
    assert snapshot(base_store) == before


def test_cifar_corrupt_pickle(tmp_path, base_store, capsys, monkeypatch, ckpt):
    make_fake_cifar100(tmp_path / "c", n_train=4, n_test=2)
    (tmp_path / "c" / "cifar-100-python" / "train").write_bytes(b"\x80\x04garbage, not a pickle")
    before = snapshot(base_store)
    args = cli_args(base_store, tmp_path / "c", ckpt)
    args[args.index("imagefolder")] = "cifar100"
    code, _, err = run_cli(capsys, monkeypatch, args)
    assert_one_line_error(code, err, "corrupt", "train")
    assert snapshot(base_store) == before


@pytest.fixture
def folder_with_bad_image(tmp_path) -> tuple[dict, Path]:
    data = make_fake_imagefolder(tmp_path / "bad", classes=("cat", "dog", "frog"), per_class=4)
    bad = data["paths"][5]  # image 5 -> chunk 2 -> shard 1
    bad.write_bytes(b"this is not a png")
    return data, bad


def test_bad_image_fail(tmp_path, folder_with_bad_image, ckpt, capsys, monkeypatch):
    data, bad = folder_with_bad_image
    store = tmp_path / "s.zarr"
    code, _, err = run_cli(capsys, monkeypatch, cli_args(store, data["root"], ckpt, "--on-bad-image", "fail"))
    assert_one_line_error(code, err, bad.name, "cannot read image")
    assert not (store / "COMPLETE.json").exists()
    committed = {p.name for p in (store / "commits").glob("*.json")} if (store / "commits").is_dir() else set()
    assert "shard-000001.json" not in committed and "shard-000002.json" not in committed


def test_bad_image_skip(tmp_path, folder_with_bad_image, base_store, ckpt):
    import pyarrow.parquet as pq

    data, bad = folder_with_bad_image
    store = tmp_path / "s.zarr"
    summary = harvest(store, data["root"], ckpt, on_bad_image="skip")
    assert summary["n_skipped_images"] == 1 and summary["n_valid_tokens"] == 11 * T_ALL
    g = zarr.open_group(str(store), mode="r")
    t = pq.read_table(store / "images.parquet").to_pydict()
    assert t["ok"] == [i != 5 for i in range(12)]
    assert t["error"][5] is not None and bad.name in t["error"][5]
    assert [e is None for e in t["error"]] == [i != 5 for i in range(12)]
    ok = g["image_ok"][:].astype(bool)
    assert ok.tolist() == t["ok"]
    for name in ("mlp_in", "mlp_out"):
        rows = f16(g[name][5 * T_ALL:6 * T_ALL])
        assert np.isnan(rows).all()
        others = f16(g[name][:]).reshape(12, T_ALL, L, D)[ok]
        assert np.isfinite(others).all()
    # the other images' rows are unaffected by the skip (the bad image's pixels are replaced, not dropped)
    base = zarr.open_group(str(base_store), mode="r")
    keep = np.repeat(ok, T_ALL)
    # (images are the same seeded noise as base_store's: same folder builder, same classes and seed)
    np.testing.assert_array_equal(g["mlp_in"][:][keep].view(np.uint16), base["mlp_in"][:][keep].view(np.uint16))
    _check_stats(g, ok)
    assert g["labels"][:].tolist() == data["labels"]
    ActivationStore(str(store))  # complete


def test_bad_image_skip_per_image_rows_are_nan(tmp_path, folder_with_bad_image, ckpt):
    data, _ = folder_with_bad_image
    store = tmp_path / "s.zarr"
    harvest(store, data["root"], ckpt, on_bad_image="skip")
    g = zarr.open_group(str(store), mode="r")
    assert np.isnan(g["resid_final"][5]).all() and np.isnan(g["embedding"][5]).all()


def test_unknown_model_name(tmp_path, base_store, folder, capsys, monkeypatch):
    before = snapshot(base_store)
    args = cli_args(base_store, folder["root"], "none")
    args[args.index(str(TINY))] = "ViT-Nope-99"
    code, _, err = run_cli(capsys, monkeypatch, args)
    assert_one_line_error(code, err, "ViT-Nope-99", "unknown")
    assert snapshot(base_store) == before


def test_pretrained_tag_offline_fails_fast(tmp_path, base_store, folder, capsys, monkeypatch):
    before = snapshot(base_store)
    args = cli_args(base_store, folder["root"], "laion2b_s34b_b79k")
    args[args.index(str(TINY))] = "ViT-B-32"
    t0 = time.monotonic()
    code, _, err = run_cli(capsys, monkeypatch, args)  # conftest sets HF_HUB_OFFLINE=1
    assert time.monotonic() - t0 < 20
    assert_one_line_error(code, err, "--pretrained /path/to/checkpoint")
    assert snapshot(base_store) == before


def test_tokenizer_is_built_once_per_model_config(tmp_path):
    from clt_pipe.backbone.loading import _register_model_name, tokenizer_for

    first = tokenizer_for(_register_model_name(str(TINY)))
    assert tokenizer_for(_register_model_name(str(TINY))) is first
    cfg = json.loads(TINY.read_text())
    cfg["text_cfg"]["context_length"] = 8
    (tmp_path / TINY.name).write_text(json.dumps(cfg))  # the same model name, other text settings
    try:
        other = tokenizer_for(_register_model_name(str(tmp_path / TINY.name)))
        assert other is not first and tuple(other(["a photo of a cat"]).shape) == (1, 8)
    finally:
        _register_model_name(str(TINY))
    assert tokenizer_for("tiny-clip") is first


def test_random_init_is_seeded_and_identified():
    """pretrained='none' must name one model: a resume or a second writer gets the same weights."""
    from clt_pipe.backbone.loading import load_backbone

    a, b = load_backbone(str(TINY), "none"), load_backbone(str(TINY), "none")
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert a.identity.weights_sha256 == b.identity.weights_sha256 != "random-init"
    assert a.identity.weights_sha256.startswith("random-init")


@pytest.mark.parametrize("change", ["model", "dataset", "tokens", "activations"])  # activations: forward precision
def test_existing_store_with_other_settings_is_refused(tmp_path, base_store, folder, ckpt, capsys, monkeypatch,
                                                       change):
    store = tmp_path / "s.zarr"
    shutil.copytree(base_store, store)
    before = snapshot(store)
    args = cli_args(store, folder["root"], ckpt)
    if change == "model":
        cfg = json.loads(TINY.read_text())
        cfg["vision_cfg"]["layers"] = 4
        other = tmp_path / "tiny-clip-4l.json"
        other.write_text(json.dumps(cfg))
        args[args.index(str(TINY))] = str(other)
        args[args.index(str(ckpt))] = "none"
    elif change == "dataset":
        other = make_fake_imagefolder(tmp_path / "other", classes=("ant", "bee"), per_class=6)
        args[args.index(str(folder["root"]))] = str(other["root"])
    elif change == "tokens":
        args += ["--tokens", "cls"]
    else:  # a bf16-autocast forward (a GPU's default) must not resume an fp32 one
        args += ["--precision", "bf16"]
    code, _, err = run_cli(capsys, monkeypatch, args)
    assert_one_line_error(code, err, "different harvest", f"{change}.", "--overwrite")
    assert snapshot(store) == before
    code, _, err = run_cli(capsys, monkeypatch, [*args, "--overwrite"])
    assert code == 0, err
    meta = zarr.open_group(str(store), mode="r").attrs["clt_pipe_store"]
    old = zarr.open_group(str(base_store), mode="r").attrs["clt_pipe_store"]
    assert meta["fingerprint"] != old["fingerprint"]
    ActivationStore(str(store))


def test_store_from_before_an_identity_field_is_still_the_same_harvest(tmp_path, base_store, folder, ckpt):
    """Stores written before ``activations.forward_precision`` existed keep resuming and re-running."""
    from clt_pipe.store.writer import fingerprint

    store = tmp_path / "old.zarr"
    shutil.copytree(base_store, store)
    g = zarr.open_group(str(store), mode="r+")
    meta = dict(g.attrs["clt_pipe_store"])
    meta["activations"] = {k: v for k, v in meta["activations"].items() if k != "forward_precision"}
    meta["dataset"] = {k: v for k, v in meta["dataset"].items() if k != "content_sha256"}  # later still
    meta.pop("identity_crc32c")  # as are the per-field checksums
    meta["fingerprint"] = fingerprint(meta)  # what the older writer computed
    g.attrs["clt_pipe_store"] = meta
    for rec_path in [*(store / "commits").glob("*.json"), store / "COMPLETE.json"]:
        rec = json.loads(rec_path.read_text())
        rec["fingerprint"] = meta["fingerprint"]
        rec_path.write_text(json.dumps(rec))
    (store / "COMPLETE.json").unlink()
    (store / "commits" / "shard-000002.json").unlink()
    summary = harvest(store, folder["root"], ckpt)
    assert summary["resumed_shards"] == 2 and summary["fingerprint"] == meta["fingerprint"]
    assert harvest(store, folder["root"], ckpt)["already_complete"]
    assert_same_arrays(store, base_store)
    with pytest.raises(StoreError, match="different harvest"):  # a real difference is still refused
        harvest(store, folder["root"], ckpt, tokens="cls")


def test_same_settings_complete_store_is_left_alone(tmp_path, base_store, folder, ckpt, capsys, monkeypatch):
    store = tmp_path / "s.zarr"
    shutil.copytree(base_store, store)
    before = snapshot(store)
    code, out, _ = run_cli(capsys, monkeypatch, cli_args(store, folder["root"], ckpt))
    assert code == 0 and "already complete" in " ".join(out.split())
    assert snapshot(store) == before


def test_invalid_tokens_is_a_config_error(tmp_path, folder, ckpt, capsys, monkeypatch):
    for bad in ("cls+0", "cls+x", "some"):
        with pytest.raises(ConfigError, match="^tokens: "):
            build(HarvestConfig, {"tokens": bad})
    store = tmp_path / "s.zarr"
    code, _, err = run_cli(capsys, monkeypatch, cli_args(store, folder["root"], ckpt, "--tokens", "cls+x"))
    assert_one_line_error(code, err, "tokens", "cls+x")
    assert not store.exists()


# ------------------------------------------------------------------------------------------ dry run, verify


def test_dry_run_writes_nothing(tmp_path, folder, ckpt, capsys, monkeypatch):
    store = tmp_path / "dry.zarr"
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(capsys, monkeypatch, cli_args(store, folder["root"], ckpt, "--dry-run"))
    assert code == 0, err
    assert not store.exists()
    assert "dry run" in out
    rows = {ln.split("│")[1].strip(): ln.split("│")[2].strip() for ln in out.splitlines() if ln.count("│") >= 3}
    assert rows["bytes_uncompressed"] == str(2 * 12 * T_ALL * L * D * 2)
    assert rows["n_shards"] == "3" and rows["n_chunks"] == "6" and rows["n_images"] == "12"


def test_verify_detects_corrupted_chunk(tmp_path, base_store, capsys, monkeypatch):
    store = tmp_path / "s.zarr"
    shutil.copytree(base_store, store)
    code, out, err = run_cli(capsys, monkeypatch, ["store", "verify", str(store)])
    assert code == 0 and "6 chunks in 3 committed shards" in out
    chunk = store / "mlp_in" / "c" / "2" / "0" / "0"  # chunk 2 -> shard 1
    raw = bytearray(chunk.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes((b ^ 0xA5) for b in raw[mid:mid + 64])
    chunk.write_bytes(bytes(raw))
    code, out, err = run_cli(capsys, monkeypatch, ["store", "verify", str(store)])
    line = assert_one_line_error(code, err, "bad shard")
    assert "[1]" in line
    assert "shard 1" in err and "shard 0" not in err and "shard 2" not in err


def test_summary_reports_whole_wall_time_and_its_parts(tmp_path, folder, ckpt, capsys, monkeypatch):
    """Issue 14: loading and the text classifier are part of the harvest's time, and printed."""
    from clt_pipe.harvest.run import TIMED_PARTS

    summary = harvest(tmp_path / "s.zarr", folder["root"], ckpt)
    parts = {k: summary[f"seconds_{k}"] for k in (*TIMED_PARTS, "setup")}
    assert all(v > 0 for k, v in parts.items() if k != "setup"), parts
    assert sum(parts.values()) <= summary["seconds"] * (1 + 1e-9)
    assert summary["seconds_images"] < summary["seconds"]
    assert summary["images_per_second"] == pytest.approx(12 / summary["seconds_images"])
    code, out, err = run_cli(capsys, monkeypatch, cli_args(tmp_path / "cli.zarr", folder["root"], ckpt))
    assert code == 0, err
    for k in (*TIMED_PARTS, "setup"):
        assert f"seconds_{k}" in out


def test_dask_workers_share_one_gpu_round_robin(monkeypatch):
    """--workers 2 on a one-GPU node: both workers use cuda:0 (issue 11); explicit devices are kept."""
    from clt_pipe.harvest.dask import _worker_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [_worker_device("cuda", i) for i in range(3)] == ["cuda:0"] * 3
    assert _worker_device("auto", 1) == "cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [_worker_device("cuda", i) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert _worker_device("cuda:1", 0) == "cuda:1" and _worker_device("cpu", 1) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _worker_device("auto", 1) == "cpu"
