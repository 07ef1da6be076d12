"""CIFAR-100 from torchvision's ``cifar-100-python`` pickles (never downloaded here)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from clt_pipe.datasets.base import (
    SINGLE_TEMPLATE,
    DatasetError,
    ImageDataset,
    ImageRecord,
    shared_zeroshot_data,
)

SPLITS = ("train", "test")
LAYOUT = "root/cifar-100-python/{train,test,meta} (torchvision's extracted cifar-100-python.tar.gz)"


def _load_pickle(path: Path) -> dict[str, object]:
    """Unpickle with ``encoding='bytes'`` (the files come from Python 2) and give the keys back as ``str``."""
    if not path.is_file():
        raise DatasetError(f"CIFAR-100 file {path} is missing; expected {LAYOUT}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - truncated/corrupt pickles raise a zoo of exception types
        raise DatasetError(f"CIFAR-100 file {path} is corrupt or truncated: {type(e).__name__}: {e}") from e
    if not isinstance(d, dict):
        raise DatasetError(f"CIFAR-100 file {path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


class Cifar100Dataset(ImageDataset):
    """The 100 fine labels; ``root`` is the folder holding ``cifar-100-python/`` or that folder itself.

    The whole split is kept decoded in memory (150 MB for train) so ``load_image`` is an array slice.
    """

    name = "cifar100"

    def __init__(self, root: str | Path, split: str):
        if split not in SPLITS:
            raise DatasetError(f"cifar100 split must be one of {SPLITS}, got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"CIFAR-100 root {root} does not exist; expected {LAYOUT}")
        folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        self.root, self.split = folder, split

        meta = _load_pickle(folder / "meta")
        try:
            self.class_names = [_text(n).replace("_", " ") for n in meta["fine_label_names"]]
        except KeyError:
            raise DatasetError(f"CIFAR-100 meta file {folder / 'meta'} has no fine_label_names") from None
        ensemble = list(shared_zeroshot_data()["cifar100"]["templates"])
        self.templates = {"single": [SINGLE_TEMPLATE], "ensemble": ensemble}

        data = _load_pickle(folder / split)
        try:
            raw = np.asarray(data["data"], dtype=np.uint8)
            labels = [int(x) for x in data["fine_labels"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"CIFAR-100 file {folder / split} lacks data/fine_labels: {e}") from e
        if raw.ndim != 2 or raw.shape[1] != 3072 or raw.shape[0] != len(labels):
            raise DatasetError(f"CIFAR-100 file {folder / split}: data {raw.shape} vs {len(labels)} labels")
        bad = [i for i, lab in enumerate(labels) if not 0 <= lab < len(self.class_names)]
        if bad:  # would be stored and later index past the zero-shot classifier
            raise DatasetError(f"CIFAR-100 file {folder / split}: label {labels[bad[0]]} at index {bad[0]} is outside "
                               f"the {len(self.class_names)} classes of {folder / 'meta'} ({len(bad)} such labels)")
        # rows are three 32x32 planes (R, G, B); store as HWC once so each image is a zero-copy view
        self._images = np.ascontiguousarray(raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self._labels = labels

    def __len__(self) -> int:
        return len(self._labels)

    def record(self, i: int) -> ImageRecord:
        return ImageRecord(i, f"{self.split}#{i}", self._labels[i])

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self._images[i])  # uint8 HxWx3 -> RGB

    def data_files(self, n: int) -> list[Path]:
        return [self.root / self.split]  # every image's pixels are in the split's one pickle


def _text(x: object) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
