"""What the commit protocol says is written: the one rule the writer (resume) and every reader share."""

from __future__ import annotations

import json

from clt_pipe.errors import StoreError
from clt_pipe.store import format as F
from clt_pipe.store.location import StoreLocation


def listed_shards(loc: StoreLocation) -> list[int]:
    """Shards with a commit record file in the store (one listing; nothing read)."""
    out = []
    for n in loc.listdir(F.COMMITS_DIR):
        stem = n[len("shard-"):-len(".json")] if n.startswith("shard-") and n.endswith(".json") else ""
        if stem.isdigit():
            out.append(int(stem))
    return sorted(out)


def commit_records(loc: StoreLocation, fingerprint: str, only: set[int] | None = None) -> dict[int, dict]:
    """Readable commit records that belong to this store, by shard (``only``: of these shards, without a
    listing). An unreadable record (torn, flipped bytes) counts as no record: its shard is not committed, to
    readers and to resume alike."""
    if only is None:
        names = [n for n in loc.listdir(F.COMMITS_DIR) if n.startswith("shard-") and n.endswith(".json")]
    else:
        names = [F.shard_commit_name(s).rsplit("/", 1)[-1] for s in sorted(only)]
    paths = [loc.path(f"{F.COMMITS_DIR}/{n}") for n in names]
    # One call for all records: object-store filesystems fetch them concurrently (thousands of shards on S3).
    blobs = loc.fs.cat(paths, on_error="return") if paths else {}
    out = {}
    for path in paths:
        data = blobs.get(path)
        if isinstance(data, BaseException):
            if isinstance(data, FileNotFoundError):
                continue
            raise data  # permission, network: not "uncommitted"; the caller names the cause
        try:
            rec = json.loads(data)
            if rec.get("fingerprint") == fingerprint:
                out[int(rec["shard"])] = rec
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return out


def committed_shards(loc: StoreLocation, fingerprint: str) -> list[int]:
    """Shards whose commit record exists, is readable and belongs to this store (sorted)."""
    return sorted(commit_records(loc, fingerprint))


def read_complete(loc: StoreLocation, fingerprint: str) -> tuple[dict | None, str | None]:
    """(COMPLETE.json if it is readable and names this store's fingerprint, else None; why an existing one is
    not this store's: unreadable, or naming another fingerprint)."""
    try:  # one read, no existence check first (a request of its own on an object store)
        rec = loc.read_json(F.COMPLETE_FILE)
    except FileNotFoundError:
        return None, None
    except StoreError as e:
        return None, str(e)
    if not isinstance(rec, dict):
        return None, f"{F.COMPLETE_FILE} is not a JSON object"
    if rec.get("fingerprint") != fingerprint:
        return None, (f"{F.COMPLETE_FILE} names fingerprint {rec.get('fingerprint')!r}, the store is "
                      f"{fingerprint!r} (edited, or left by another harvest)")
    return rec, None


def complete_record(loc: StoreLocation, fingerprint: str) -> dict | None:
    """COMPLETE.json if it is readable and names this store's fingerprint, else None."""
    return read_complete(loc, fingerprint)[0]


def is_complete(loc: StoreLocation, fingerprint: str, n_shards: int | None = None) -> bool:
    """COMPLETE.json is written last, after finalisation; it must name this store's fingerprint. With
    ``n_shards``, every shard's commit record must also still be there and readable (a record deleted or
    damaged after finalisation makes the store incomplete to every reader, not only to ``verify``)."""
    if complete_record(loc, fingerprint) is None:
        return False
    return n_shards is None or set(committed_shards(loc, fingerprint)) == set(range(n_shards))
