"""scikit-learn's bundled handwritten digits as an :class:`ImageDataset` (fully offline, no download).

``sklearn.datasets.load_digits`` ships 1,797 grey 8x8 images (pixel values 0..16, 10 classes) inside the
scikit-learn wheel. The demo trains its own tiny CLIP on them (``clt_pipe.demo.tinyclip``) and harvests it.

Split (fixed, seeded, stratified): for every class ``c`` (in 0..9) the original indices of that class,
ascending, are permuted with ``numpy.random.default_rng(seed)`` (one generator, consumed class by class in
order 0..9); the first ``round(n_c * test_fraction)`` of the permutation go to ``test``, the rest to
``train``. Each split is then sorted by original index, so dataset index ``i`` follows sklearn's order.
``all`` is every image in sklearn's original order (the split arguments are ignored). With the defaults
(seed 0, test_fraction 0.2) ``train`` has 1,438 images and ``test`` 359.

Images: value ``v`` in 0..16 becomes ``round(v * 255 / 16)`` -> a white digit on a black background (the
"ink" is bright), as an 8x8 ``L`` image upscaled bilinearly to 32x32 (``IMAGE_SIZE``, the tiny CLIP's input
size) and converted to RGB (three equal channels).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from clt_pipe.datasets.base import BadImageError, DatasetError, ImageDataset, ImageRecord

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SINGLE_TEMPLATE = "a photo of the number {c}."
ENSEMBLE_TEMPLATES = [
    "a photo of the number {c}.",
    "a handwritten {c}.",
    "a picture of the digit {c}.",
    "the number {c}, written by hand.",
    "a blurry photo of the digit {c}.",
    "a scan of a handwritten number {c}.",
]
IMAGE_SIZE = 32
SPLITS = ("train", "test", "all")


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] with values 0..16, labels int64 [1797]) from scikit-learn, read once."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64).round().astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@lru_cache(maxsize=16)
def split_indices(split: str = "train", seed: int = 0, test_fraction: float = 0.2) -> np.ndarray:
    """Original sklearn indices (ascending) of ``split``; see the module docstring for the recipe."""
    if split not in SPLITS:
        raise DatasetError(f"digits: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    _, labels = _raw_digits()
    if split == "all":
        out = np.arange(len(labels), dtype=np.int64)
    else:
        if not 0.0 < test_fraction < 1.0:
            raise DatasetError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
        rng = np.random.default_rng(seed)
        test_parts, train_parts = [], []
        for c in range(len(CLASS_NAMES)):
            idx = np.flatnonzero(labels == c)
            perm = rng.permutation(idx)
            n_test = int(round(len(idx) * test_fraction))
            test_parts.append(perm[:n_test])
            train_parts.append(perm[n_test:])
        out = np.sort(np.concatenate(test_parts if split == "test" else train_parts)).astype(np.int64)
    out.setflags(write=False)
    return out


def load_digits_arrays(
    split: str = "train", seed: int = 0, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw arrays of a split, fast (no PIL): ``(images uint8 [N, 8, 8] in 0..16, labels int64 [N], orig_idx)``."""
    images, labels = _raw_digits()
    idx = split_indices(split, seed, test_fraction)
    return images[idx], labels[idx], idx


def digit_to_pil(pixels: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """An 8x8 array with values 0..16 -> RGB PIL image ``size`` x ``size`` (white digit on black, bilinear)."""
    arr = np.asarray(pixels, dtype=np.float64)
    if arr.shape != (8, 8):
        raise ValueError(f"expected an 8x8 digit, got shape {arr.shape}")
    grey = np.clip(np.round(arr * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(grey, mode="L")
    if size != 8:
        img = img.resize((size, size), resample=Image.Resampling.BILINEAR)
    return img.convert("RGB")


class DigitsDataset(ImageDataset):
    """sklearn digits, split ``train`` | ``test`` | ``all`` (seeded, stratified; see module docstring)."""

    name = "digits"

    def __init__(self, split: str = "train", seed: int = 0, test_fraction: float = 0.2):
        self.split = split
        self.seed = int(seed)
        self.test_fraction = float(test_fraction)
        self._images, self._labels, self._orig = load_digits_arrays(split, self.seed, self.test_fraction)
        self.class_names = list(CLASS_NAMES)
        self.templates = {"single": [SINGLE_TEMPLATE], "ensemble": list(ENSEMBLE_TEMPLATES)}

    def __len__(self) -> int:
        return int(len(self._orig))

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"digits[{self.split}]: index {i} out of range 0..{len(self) - 1}")
        return i

    def record(self, i: int) -> ImageRecord:
        i = self._check(i)
        y = int(self._labels[i])
        return ImageRecord(index=i, source=f"sklearn-digits#{int(self._orig[i])}", label=y, labels=(y,))

    def load_image(self, i: int) -> Image.Image:
        i = self._check(i)
        try:
            return digit_to_pil(self._images[i])
        except Exception as exc:  # pragma: no cover - the bundled data is always decodable
            raise BadImageError(f"digits[{self.split}] image {i} (sklearn-digits#{int(self._orig[i])}): {exc}") from exc

    def describe(self) -> dict:
        d = super().describe()
        d.update({"seed": self.seed, "test_fraction": self.test_fraction})
        return d
