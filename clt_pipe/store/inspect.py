"""`clt-pipe store info | verify | ls`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from clt_pipe.checksums import crc32c, sha256_bytes
from clt_pipe.errors import StoreError
from clt_pipe.store import format as F
from clt_pipe.store.location import StoreLocation
from clt_pipe.store.meta import ABSENT
from clt_pipe.store.reader import ActivationStore


def _stored_bytes(store: ActivationStore) -> int:
    total = 0
    for name in store.meta.activation_arrays:
        try:
            total += int(store.group[name].nbytes_stored())
        except Exception:  # noqa: BLE001 - some fsspec backends cannot list sizes cheaply
            return -1
    return total


def store_info(url: str) -> dict:
    s = ActivationStore(url, require_complete=False)
    lay, m = s.layout, s.meta
    committed = s.committed_shards()
    raw = lay.activation_bytes(len(m.activation_arrays))
    stored = _stored_bytes(s)
    info = {
        "format_version": m.format_version,
        "complete": s.is_complete,
        "status": "complete" if s.is_complete else "INCOMPLETE: re-run the same harvest command to resume it",
        "shards_committed": f"{len(committed)}/{lay.n_shards}",
        "model": f"{m.model.name} ({m.model.pretrained})",
        "weights_sha256": m.model.weights_sha256[:16],
        "layers x width": f"{lay.n_layers} x {lay.d_model}",
        "dataset": f"{m.dataset.name}/{m.dataset.split} ({len(m.dataset.class_names)} classes)",
        "tokens": f"{m.tokens.policy} ({lay.tokens_per_image}/image)",
        "images": lay.n_images,
        "token rows": lay.n_tokens,
        "chunk": f"{lay.rows_per_chunk} rows ({lay.images_per_chunk} images)",
        "dtype / codec": f"{m.activations.dtype} / {m.activations.compressor}",
        "targets": ("recomputed from mlp_in and the stored MLP weights" if s.recompute else "stored (mlp_out)"),
        f"GB uncompressed ({'+'.join(m.activation_arrays)})": round(raw / 1e9, 4),
        "GB stored": round(stored / 1e9, 4) if stored >= 0 else "n/a",
        "compression ratio": round(raw * len(committed) / max(lay.n_shards, 1) / stored, 3) if stored > 0 else "n/a",
        "created": "" if m.created is ABSENT else m.created,
        "fingerprint": m.fingerprint,
    }
    if s.is_complete:
        info["finished"] = s.complete_record.get("finished", "")
        info["checksums"] = ("every named array and file" if s.file_checksums is not None else
                             "chunks and per-image rows only (written before stats/head/text_classifier/"
                             "images.parquet checksums; re-harvest with --overwrite to add them)")
    elif s.complete_problem:
        info["status"] = f"INCOMPLETE: {s.complete_problem}; run `clt-pipe store repair {url}`, then the same harvest"
    elif s.complete_record is not None:
        lost = sorted(set(range(lay.n_shards)) - set(committed))
        info["status"] = (f"INCOMPLETE: commit record(s) of shard(s) {lost[:5]} missing or unreadable; "
                          f"run `clt-pipe store repair {url}`, then the same harvest command")
    return info


def _check_shard(s: ActivationStore, shard: int, weights_ok: bool) -> list[str]:
    problems = []
    try:
        rec = s.commit_record(shard)
    except Exception as e:  # noqa: BLE001
        return [f"commit record unreadable: {e}"]
    lay = s.layout
    imgs = lay.shard_images(shard)
    if rec.get("images") != [imgs.start, imgs.stop]:
        problems.append(f"commit covers images {rec.get('images')}, layout says {[imgs.start, imgs.stop]}")
    for chunk in lay.shard_chunks(shard):
        want = rec.get("chunk_crc32c", {}).get(str(chunk))
        if want is None:
            problems.append(f"chunk {chunk}: no checksum in commit record")
            continue
        try:
            arrays = s.read_chunk(chunk, check=False)
        except Exception as e:  # noqa: BLE001 - a corrupt chunk fails to decode
            problems.append(f"chunk {chunk}: unreadable ({type(e).__name__}: {e})")
            continue
        for name, arr in zip(s.meta.activation_arrays, arrays):
            if crc32c(arr) != want[name]:
                problems.append(f"chunk {chunk} of {name}: checksum mismatch")
    if s.recompute and weights_ok:
        problems += _check_recomputed_targets(s, shard, rec)
    for side, want in rec.get("moments_crc32c", {}).items():
        try:
            ok = crc32c(s.group[f"{F.STATS_GROUP}/shard_moments_{side}"][shard]) == want
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            problems.append(f"{F.STATS_GROUP}/shard_moments_{side}[{shard}]: checksum mismatch or unreadable")
    for name, want in rec.get("per_image_crc32c", {}).items():
        try:
            ok = crc32c(s.group[name][imgs.start:imgs.stop]) == want
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name} rows {imgs.start}-{imgs.stop}: unreadable ({type(e).__name__}: {e})")
            continue
        if not ok:
            problems.append(f"{name} rows {imgs.start}-{imgs.stop}: checksum mismatch")
    return problems


def _check_final(s: ActivationStore) -> list[str]:
    """COMPLETE.json's checksums: every finalised array and images.parquet (stores that have them)."""
    sums = s.file_checksums
    if sums is None:
        return []
    problems = []
    for name, want in (sums.get("arrays") or {}).items():
        try:
            got = crc32c(s.group[name][:])
        except KeyError:
            problems.append(f"{name}: missing")
            continue
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
            continue
        if got != want:
            problems.append(f"{name}: checksum mismatch")
    for name, want in (sums.get("files") or {}).items():
        try:
            with s.loc.fs.open(s.loc.path(name), "rb") as fh:
                got = sha256_bytes(fh.read())
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if got != want:
            problems.append(f"{name}: checksum mismatch")
    return problems


# Recomputing from fp16/bf16-rounded inputs moves the targets by about the inputs' rounding error; far above
# this means the stored weights or activation do not belong to the stored activations.
RECOMPUTE_TOLERANCE = {"fp16": 2e-2, "bf16": 5e-2}


def _check_recomputed_targets(s: ActivationStore, shard: int, rec: dict) -> list[str]:
    """The shard's first image: stored true mlp_out (mlp_out_check) vs recomputed from its stored mlp_in."""
    import torch

    check = s.group[F.MLP_OUT_CHECK][shard]
    if rec.get("mlp_out_check_crc32c") is None:
        return []  # the shard's first image was skipped: nothing to compare
    if crc32c(check) != rec["mlp_out_check_crc32c"]:
        return [f"{F.MLP_OUT_CHECK}: checksum mismatch"]
    T = s.layout.tokens_per_image
    r0 = s.layout.shard_images(shard).start * T
    x = torch.from_numpy(s.decode(s.group[F.MLP_IN][r0:r0 + T]))
    got = s.targets_on("cpu")(x).numpy()
    want = s.decode(check)
    rel = np.sqrt(((got - want) ** 2).mean(axis=(0, 2)) / np.maximum((want ** 2).mean(axis=(0, 2)), 1e-30))
    tol = RECOMPUTE_TOLERANCE[s.dtype]
    if not np.all(rel <= tol):
        worst = int(np.argmax(rel))
        return [f"recomputed targets differ from the stored sample (layer {worst}: relative RMS {rel[worst]:.3g} "
                f"> {tol}): the MLP weights do not match the activations"]
    return []


def verify_store(url: str, threads: int = 4) -> dict:
    s = ActivationStore(url, require_complete=False)
    with s.loc.errors("read"):
        return _verify(s, threads)


def _verify(s: ActivationStore, threads: int) -> dict:
    shards = s.committed_shards()
    weights_problem = None
    if s.recompute:  # checked (checksums of every weight array) once for the store, not per shard
        try:
            s.targets_on("cpu")
        except StoreError as e:
            weights_problem = str(e)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda sh: (sh, _check_shard(s, sh, weights_problem is None)), shards))
    problems = [(sh, p) for sh, ps in results for p in ps]
    bad = sorted({sh for sh, _ in problems})
    if weights_problem is not None:
        problems.append((-1, weights_problem))
        bad.append(-1)
    if s.complete_record is not None and len(shards) != s.layout.n_shards:
        lost = sorted(set(range(s.layout.n_shards)) - set(shards))
        problems += [(sh, "commit record missing or unreadable") for sh in lost]
        bad += lost
    if s.complete_problem:
        problems.append((-1, s.complete_problem))
        bad.append(-1)
    final_problems = _check_final(s) if s.complete_record is not None else []
    problems += [(-1, p) for p in final_problems]
    if final_problems:
        bad.append(-1)
    if s.is_complete and not final_problems:
        try:
            finite = np.isfinite(s.group[F.STATS_GROUP]["mean_in"][:]).all()
        except Exception as e:  # noqa: BLE001
            finite = False
            problems.append((-1, f"merged statistics unreadable ({type(e).__name__})"))
        if not finite:
            problems.append((-1, "merged statistics contain NaN"))
            bad.append(-1)
    bad = sorted(set(bad))
    return {"complete": s.is_complete, "checked_shards": len(shards),
            "checked_chunks": sum(len(s.layout.shard_chunks(sh)) for sh in shards),
            "bad_shards": bad, "problems": problems}


def repair_store(url: str, threads: int = 4) -> dict:
    """Make a damaged store re-harvestable: verify it, then drop the commit records of the bad shards and, if
    anything is wrong, COMPLETE.json, plus any damaged head/text_classifier/mlp_weights group (written again
    before any shard). Re-running the same harvest command then rewrites exactly those shards and finalises
    again (merged statistics and images.parquet are recomputed by every finalisation)."""
    report = verify_store(url, threads=threads)
    s = ActivationStore(url, require_complete=False)
    moved = [f"shard {sh}: {p}" for sh, p in report["problems"] if p.startswith("commit covers images")]
    if moved:  # dropping commits and re-harvesting would rebuild the store to a layout it was not written with
        raise StoreError(f"{url}: the store's layout no longer matches its commit records ({moved[0]}); repair "
                         f"does not act on it: restore the original zarr.json, or re-harvest with --overwrite")
    shards = [sh for sh in report["bad_shards"] if sh >= 0]
    groups = sorted({p.split("/")[0] for sh, p in report["problems"] if sh < 0 and "/" in p.split(":")[0]}
                    & {F.HEAD_GROUP, F.TEXT_GROUP, F.MLP_GROUP})
    if s.recompute and any(sh < 0 and "weights" in p.lower() for sh, p in report["problems"]):
        groups = sorted(set(groups) | {F.MLP_GROUP})
    with s.loc.errors("repair"):
        for sh in shards:
            s.loc.remove(F.shard_commit_name(sh))
        for g in groups:
            s.loc.remove(g)
        if report["bad_shards"]:
            s.loc.remove(F.COMPLETE_FILE)
    return {"dropped_shards": shards, "dropped_groups": groups, "problems": report["problems"],
            "was_complete": report["complete"]}


def list_stores(root: str) -> list[dict]:
    loc = StoreLocation(root)
    rows = []
    for name in loc.listdir(""):
        url = f"{root.rstrip('/')}/{name}"
        try:
            s = ActivationStore(url, require_complete=False)
        except StoreError:
            continue
        m = s.meta
        rows.append({"store": url, "model": m.model.name, "dataset": f"{m.dataset.name}/{m.dataset.split}",
                     "tokens": str(m.tokens.policy), "images": s.layout.n_images,
                     "complete": s.is_complete})
    return rows
