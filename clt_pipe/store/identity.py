"""The store's own metadata under checksum: the root description (``zarr.json``) and ``COMPLETE.json``.

Chunks are checked against their commit records; these two files say what the chunks *are* (model, weights,
class names, layout) and how many there are, so an edit to them would silently relabel or cut a store.

- Root description: ``identity_crc32c`` maps each sealed field (``section.key`` of the identity sections and
  the templates, plus ``format_version``) to the CRC-32C of its canonical JSON, so an edit is named field by
  field. Stores written before the seal are checked through their ``fingerprint``, itself a hash of the
  identity sections (an edit is detected, not named).
- ``COMPLETE.json``: ``record_crc32c`` over the rest of the record, and its counts against the layout and the
  commit records, so an edited count is named with the value it should have.

Both are additive keys (storage/FORMAT.md, "Metadata checksums"): older readers ignore them.
"""

from __future__ import annotations

import hashlib
import json

from clt_pipe.checksums import crc32c
from clt_pipe.store.meta import StoreMeta

# Root-attribute keys whose change makes an existing store a different store (refuse unless --overwrite).
IDENTITY_KEYS = ("model", "dataset", "tokens", "activations", "layout", "preprocess")


def fingerprint(meta: StoreMeta | dict) -> str:
    """What resume, commit records and fit runs compare: a hash of the identity sections, without the
    informational ``model.model_arg`` and ``dataset.data_root``."""
    if isinstance(meta, StoreMeta):
        meta = meta.to_dict()
    ident = {k: meta[k] for k in IDENTITY_KEYS}
    ident["model"] = {k: v for k, v in ident["model"].items() if k != "model_arg"}
    ident["dataset"] = {k: v for k, v in ident["dataset"].items() if k != "data_root"}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

SEAL_KEY = "identity_crc32c"
RECORD_KEY = "record_crc32c"
SEALED_SECTIONS = (*IDENTITY_KEYS, "templates")
SEALED_TOP = ("format_version",)
FIX_DESCRIPTION = "restore the original zarr.json, or re-harvest with --overwrite"


def _crc(value) -> int:
    return crc32c(json.dumps(value, sort_keys=True).encode())


def _fields(meta: dict) -> dict[str, object]:
    out = {k: meta[k] for k in SEALED_TOP if k in meta}
    for section in SEALED_SECTIONS:
        for key, value in (meta.get(section) or {}).items():
            out[f"{section}.{key}"] = value
    return out


def seal(meta: dict) -> dict:
    """``meta`` (a store description as stored) with its per-field checksums."""
    return {**meta, SEAL_KEY: {name: _crc(v) for name, v in _fields(meta).items()}}


def edited_fields(meta: dict) -> list[str]:
    """Sealed fields whose value no longer matches its checksum, or that were removed or added."""
    sealed, now = meta.get(SEAL_KEY) or {}, _fields(meta)
    changed = [name for name, crc in sealed.items() if name not in now or _crc(now[name]) != crc]
    return changed + [name for name in now if name not in sealed]


def description_problem(meta: dict) -> str | None:
    """Why a store's root description cannot be trusted (edited after the harvest), or None."""
    if isinstance(meta.get(SEAL_KEY), dict):
        changed = edited_fields(meta)
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            return (f"its description in zarr.json was edited after the harvest ({shown} no longer match their "
                    f"checksums); {FIX_DESCRIPTION}")
    try:
        recomputed = fingerprint(meta)
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"its description in zarr.json lacks identity sections; {FIX_DESCRIPTION}"
    if recomputed != meta.get("fingerprint"):
        return (f"its description in zarr.json does not hash to its fingerprint {meta.get('fingerprint')!r} "
                f"(edited after the harvest?); {FIX_DESCRIPTION}")
    return None


def seal_record(record: dict) -> dict:
    """A COMPLETE.json record with the checksum of the rest of it."""
    rest = {k: v for k, v in record.items() if k != RECORD_KEY}
    return {**rest, RECORD_KEY: _crc(rest)}


def record_problem(record: dict, layout, commit_records: dict[int, dict]) -> str | None:
    """Why a COMPLETE.json of this store cannot be trusted (counts that disagree with the layout and the commit
    records, or an edit its checksum shows), or None."""
    expected = {"n_shards": layout.n_shards, "n_images": layout.n_images, "n_tokens": layout.n_tokens}
    if set(commit_records) == set(range(layout.n_shards)):
        expected["n_valid_tokens"] = sum(int(r.get("valid_tokens", 0)) for r in commit_records.values())
        expected["n_skipped_images"] = sum(len(r.get("skipped") or {}) for r in commit_records.values())
    wrong = [f"{k} {record[k]!r} != {v!r}" for k, v in expected.items() if k in record and record[k] != v]
    if wrong:
        return f"{', '.join(wrong[:3])} (the layout and commit records' counts): edited after the harvest"
    want = record.get(RECORD_KEY)
    if want is not None and seal_record(record)[RECORD_KEY] != want:
        return "it does not match its checksum (edited after the harvest)"
    return None
