"""Cheap checks of a stage's inputs, run before the stage's heavy imports and before any model is built.

A missing ``--data-root``, a store that is not there or a ``--device cuda`` on a CPU machine should cost a
second, not the tens of seconds of importing open_clip and building a ViT. Each check raises the same
``CltPipeError`` the stage itself would raise later; the stage keeps its own checks (they guard library use).
"""

from __future__ import annotations

from pathlib import Path

from clt_pipe.config import AnalyzeConfig, FitConfig, HarvestConfig
from clt_pipe.errors import ConfigError


def check(cfg: HarvestConfig | FitConfig | AnalyzeConfig, *, made_upstream: bool = False) -> None:
    """Check ``cfg``'s inputs; ``made_upstream``: an earlier stage of the same pipeline makes its store/CLT."""
    from clt_pipe.device import resolve_device

    resolve_device(cfg.device)
    out = getattr(cfg, "out", "")
    if out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"out: --out {out} is a file, not a directory")
    if isinstance(cfg, HarvestConfig):
        _harvest(cfg)
    elif made_upstream:
        return
    elif isinstance(cfg, FitConfig):
        _open_store(cfg.store)
    elif isinstance(cfg, AnalyzeConfig):
        _analyze(cfg)


def check_export(run_dir: str, store_url: str) -> None:
    """Refuse a fitted run circuit-tracer cannot read faithfully, from run.json alone, before torch loads
    (``export_for_circuit_tracer`` asks the loaded CLT the same)."""
    from clt_pipe.clt.rundir import read_run
    from clt_pipe.clt.spec import sparsifier
    from clt_pipe.errors import CltPipeError

    name = read_run(run_dir).get("spec", {}).get("sparsifier")
    why = sparsifier(name).circuit_tracer_refusal(bool(store_url)) if name else None
    if why:
        raise CltPipeError(why)
    if store_url:
        _check_url_scheme(store_url)


def _harvest(cfg: HarvestConfig) -> None:
    from clt_pipe.datasets.registry import check_root

    check_root(cfg.dataset, cfg.data_root, cfg.split)
    if cfg.model.endswith(".json") and not Path(cfg.model).is_file():
        raise ConfigError(f"model: model-config file {cfg.model!r} not found")
    if _looks_like_path(cfg.pretrained) and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"pretrained: checkpoint file {cfg.pretrained!r} not found")
    _check_url_scheme(cfg.store)


def _analyze(cfg: AnalyzeConfig) -> None:
    from clt_pipe.clt.rundir import read_run
    from clt_pipe.datasets.registry import check_root
    from clt_pipe.errors import CltPipeError

    from clt_pipe.clt.sweepdir import is_sweep, member_dirs

    store = _open_store(cfg.store)
    if is_sweep(cfg.clt):
        member_dirs(cfg.clt)  # a sweep: its members are checked one by one when their turn comes
    else:
        read_run(cfg.clt)
    if {"closedloop", "ablation"} & set(cfg.only):
        ds = store.meta.dataset
        if ds.name != "digits" and not cfg.data_root:
            raise CltPipeError(f"closedloop/ablation re-run the ViT on the store's {ds.name} images: pass "
                               f"--data-root (the store was harvested from {ds.data_root or '?'}), or "
                               f"leave them out with --only")
        check_root(ds.name, cfg.data_root, cfg.split or ds.split)


def _open_store(url: str):
    from clt_pipe.store.reader import ActivationStore

    _check_url_scheme(url)
    return ActivationStore(url)


def _looks_like_path(pretrained: str) -> bool:
    """open_clip tags are bare words (openai, laion2b_s34b_b79k); a checkpoint is named by a file path."""
    if pretrained.startswith("hf-hub:"):
        return False
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _check_url_scheme(url: str) -> None:
    """``s3://...`` needs s3fs (the ``s3`` extra): say so now, not after the model has loaded."""
    if "://" not in url or url.startswith("file://"):
        return
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"store: {url!r} needs an fsspec filesystem for {protocol}:// ({e})") from None
