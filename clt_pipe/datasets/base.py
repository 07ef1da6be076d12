"""The one interface every image dataset implements.

A dataset is an indexed, deterministic list of images: ``record(i)`` is cheap (no decoding) and gives the
provenance that goes into ``images.parquet``; ``load_image(i)`` decodes. Class names and zero-shot prompt
templates travel with the dataset because the store embeds its zero-shot text classifier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from PIL import Image

from clt_pipe.errors import CltPipeError

SINGLE_TEMPLATE = "a photo of a {c}."


class DatasetError(CltPipeError):
    """Dataset root missing or incomplete, or an unknown dataset/split."""


class BadImageError(CltPipeError):
    """One image could not be read or decoded (corrupt file, truncated pickle entry...)."""


@dataclass(frozen=True)
class ImageRecord:
    index: int  # position in the dataset (after split / class restriction), = image index in the store
    source: str  # where the image came from: file path relative to the root, or "<file>#<row>"
    label: int  # the single label used for zero-shot top-1 (-1 if unlabelled)
    labels: tuple[int, ...] = field(default_factory=tuple)  # every label (COCO multi-label); () -> (label,)


class ImageDataset:
    """Base class; subclasses fill ``name``, ``split``, ``class_names``, ``templates`` and the two methods."""

    name: str = ""
    split: str = ""
    class_names: list[str]
    templates: dict[str, list[str]]  # template-set name -> templates with a "{c}" slot

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def record(self, i: int) -> ImageRecord:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_image(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        """RGB PIL image; raises ``BadImageError`` naming the image if it cannot be decoded."""
        raise NotImplementedError

    def data_files(self, n: int) -> list[Path]:
        """The files the first ``n`` images are read from (their content fingerprint is part of a store's
        identity); none for a dataset shipped inside a package."""
        return []

    def describe(self) -> dict:
        """Identity recorded in the store's root attributes."""
        return {"name": self.name, "split": self.split, "n_images": len(self), "n_classes": len(self.class_names)}


@lru_cache(maxsize=1)
def shared_zeroshot_data() -> dict:
    """CLIP-style class names and template ensembles shipped with the package (copied from shared/data)."""
    text = resources.files("clt_pipe.datasets").joinpath("data/zeroshot_classnames_templates.json").read_text()
    return json.loads(text)


def package_data_text(name: str) -> str:
    return resources.files("clt_pipe.datasets").joinpath(f"data/{name}").read_text()
