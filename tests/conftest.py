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
