"""What the commit protocol says is written: the one rule the writer (resume) and every reader share."""

from __future__ import annotations

from clt_pipe.store import format as F
from clt_pipe.store.location import StoreLocation


def committed_shards(loc: StoreLocation, fingerprint: str) -> list[int]:
    """Shards whose commit record exists and belongs to this store (sorted)."""
    done = []
    for name in loc.listdir(F.COMMITS_DIR):
        if name.startswith("shard-") and name.endswith(".json"):
            rec = loc.read_json(f"{F.COMMITS_DIR}/{name}")
            if rec.get("fingerprint") == fingerprint:
                done.append(int(rec["shard"]))
    return sorted(done)


def is_complete(loc: StoreLocation, fingerprint: str) -> bool:
    """COMPLETE.json is written last, after finalisation; it must name this store's fingerprint."""
    if not loc.exists(F.COMPLETE_FILE):
        return False
    return loc.read_json(F.COMPLETE_FILE).get("fingerprint") == fingerprint
