"""Test-wide settings: never touch the network, keep torch to the machine's cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"


@pytest.fixture
def tiny_model_config() -> pathlib.Path:
    """A tiny open_clip CLIP config (6 layers, width 64, 32 px, 8 px patches -> 17 tokens)."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_clip_one_epoch(tmp_path_factory):
    """The demo's tiny CLIP trained for one epoch (seed 0), once per test session: the determinism and cache
    tests compare against it instead of each training their own."""
    from clt_pipe.demo import tinyclip as tc

    return tc.train_tiny_clip(tmp_path_factory.mktemp("tiny-clip-1ep"), seed=0, epochs=1)
