"""ImageNet-100: the 100 classes of ``data/imagenet100_wnids.txt`` read from an ImageNet folder tree."""

from __future__ import annotations

from pathlib import Path

from clt_pipe.datasets.base import DatasetError, package_data_text, shared_zeroshot_data
from clt_pipe.datasets.imagefolder import ClassFolders, imagenet_templates

SPLITS = ("train", "val")
LAYOUT = "root/{train,val}/<wnid>/*.JPEG"


def imagenet100_wnids() -> list[str]:
    """The 100 wnids, sorted: label i is the i-th wnid in sorted order (as torchvision's ImageFolder would)."""
    return sorted(line.strip() for line in package_data_text("imagenet100_wnids.txt").splitlines() if line.strip())


def imagenet_clip_names(wnids: list[str]) -> list[str]:
    """CLIP-style names of ``wnids``, via each wnid's index in the 1000-class ImageNet order."""
    order = [line.split()[0] for line in package_data_text("imagenet1k_synsets.txt").splitlines() if line.strip()]
    index = {w: k for k, w in enumerate(order)}
    names = shared_zeroshot_data()["imagenet1k"]["classnames"]
    return [names[index[w]] for w in wnids]


class ImageNet100Dataset(ClassFolders):
    """``root/{train,val}/<wnid>/*.JPEG``; other wnid folders under the split are ignored.

    Labels follow the sorted wnid list (``imagenet100_wnids()``), not the ImageNet-1k index.
    """

    name = "imagenet100"

    def __init__(self, root: str | Path, split: str):
        if split not in SPLITS:
            raise DatasetError(f"imagenet100 split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.split = split
        base = self.root / split
        if not base.is_dir():
            raise DatasetError(f"imagenet100 folder {base} does not exist; expected {LAYOUT}")
        wnids = imagenet100_wnids()
        missing = [w for w in wnids if not (base / w).is_dir()]
        if missing:
            raise DatasetError(
                f"imagenet100: {len(missing)} of {len(wnids)} class folders missing under {base} "
                f"(first: {', '.join(missing[:5])}); expected {LAYOUT}"
            )
        self.class_names = imagenet_clip_names(wnids)
        self.templates = imagenet_templates()
        self._index([base / w for w in wnids])
