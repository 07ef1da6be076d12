"""`clt-pipe demo`: the whole pipeline offline on 2 CPU cores.

Trains (or loads from its cache) the tiny CLIP on scikit-learn's digits, then runs pipelines/demo.toml
(shipped inside the package as demo/assets/demo.toml) and prints where the report is and its headline numbers.
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path

from clt_pipe.pipeline import run_pipeline


def demo_pipeline_path() -> Path:
    return Path(str(resources.files("clt_pipe.demo").joinpath("assets/demo.toml")))


def run_demo(workdir: str, seed: int = 0, fast: bool = False, device: str = "cpu", console=None) -> dict:
    from clt_pipe.demo.tinyclip import ensure_tiny_clip

    say = console.print if console else print
    t0 = time.perf_counter()
    say("[bold]demo[/]: tiny CLIP on sklearn digits (cached after the first run)")
    art = ensure_tiny_clip(seed=seed, progress=None)
    say(f"  tiny CLIP zero-shot top-1 on the digits test split: {art.meta.get('zero_shot_top1_test', float('nan')):.3f}"
        f"  ({art.checkpoint_path})")
    env = {"CLT_PIPE_TINY_CLIP_CONFIG": str(art.config_path), "CLT_PIPE_TINY_CLIP_CKPT": str(art.checkpoint_path),
           "CLT_PIPE_DEMO_DIR": workdir}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        pipeline = demo_pipeline_path()
        if fast or device != "cpu":
            pipeline = _variant(pipeline, Path(workdir), fast, device)
        results = run_pipeline(pipeline, console=console)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    report_dir = Path(workdir) / "report"
    headline = headline_numbers(report_dir / "report.json")
    headline["tiny_clip_zero_shot_top1"] = art.meta.get("zero_shot_top1_test")
    headline["wall_seconds"] = round(time.perf_counter() - t0, 1)
    say(f"[bold green]report:[/] {report_dir / 'report.html'}")
    for k, v in headline.items():
        say(f"  {k}: {v}")
    return {"results": results, "headline": headline, "report": str(report_dir / "report.html")}


def _variant(pipeline: Path, workdir: Path, fast: bool, device: str) -> Path:
    """The same pipeline with fewer fit steps (smoke tests) and/or another device; written beside the outputs
    so it is inspectable."""
    text = pipeline.read_text()
    if fast:
        text = text.replace("steps = 1500", "steps = 150").replace("checkpoint_every = 500", "checkpoint_every = 100")
    text = text.replace('device = "cpu"', f'device = "{device}"')
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "demo-variant.toml"
    out.write_text(text)
    return out


def headline_numbers(report_json: Path) -> dict:
    if not report_json.is_file():
        return {}
    rep = json.loads(report_json.read_text())
    return rep.get("headline", {})
