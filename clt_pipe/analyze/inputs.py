"""The check every analysis entry point makes first: the CLT was trained on activations of the store's model."""

from __future__ import annotations

from clt_pipe.errors import CltPipeError
from clt_pipe.store.reader import ActivationStore

IDENTITY_KEYS = ("name", "weights_sha256", "n_layers", "d_model")


def _describe_model(m: dict, other: dict) -> str:
    sha = distinct_prefix(str(m.get("weights_sha256", "?")), str(other.get("weights_sha256", "?")))
    return f"{m.get('name', '?')} ({m.get('n_layers', '?')} layers × {m.get('d_model', '?')}, weights {sha})"


def distinct_prefix(a: str, b: str, least: int = 12) -> str:
    """``a`` cut to ``least`` characters, or further where ``b`` shares a longer prefix, so two ids that differ
    never print alike (random-init ids share their first 12 characters)."""
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:max(least, common + 8)]


def check_clt_matches_store(store: ActivationStore, clt, run_meta: dict) -> None:
    trained = dict((run_meta.get("store") or {}).get("model") or {})
    trained.setdefault("n_layers", clt.spec.n_layers)
    trained.setdefault("d_model", clt.spec.d_model)
    held = store.model
    spec_ok = clt.spec.n_layers == store.n_layers and clt.spec.d_model == store.d_model
    ident_ok = all(trained.get(k) == held.get(k) for k in IDENTITY_KEYS if k in trained)
    if not (spec_ok and ident_ok):
        raise CltPipeError(f"CLT trained on {_describe_model(trained, held)} (CLT spec {clt.spec.n_layers} layers × "
                           f"{clt.spec.d_model}) but store holds {_describe_model(held, trained)}; analyse it with a "
                           f"store of the same model")
