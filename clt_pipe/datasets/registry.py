"""Dataset name -> implementation, the one place the pipeline opens datasets."""

from __future__ import annotations

from pathlib import Path

from clt_pipe.datasets.base import DatasetError, ImageDataset

NAMES = ("cifar100", "imagenet100", "coco", "imagefolder", "digits")


def open_dataset(
    name: str, root: str | Path, split: str, *, coco_label_rule: str = "largest_area"
) -> ImageDataset:
    """Open dataset ``name`` (see ``NAMES``) at ``root``; ``digits`` is synthetic and ignores ``root``.

    Raises ``DatasetError`` for an unknown name, a bad split, a missing/incomplete root or zero images.
    """
    # imports are local so one dataset's optional dependencies never break opening another
    if name == "cifar100":
        from clt_pipe.datasets.cifar100 import Cifar100Dataset

        ds: ImageDataset = Cifar100Dataset(root, split)
    elif name == "imagenet100":
        from clt_pipe.datasets.imagenet100 import ImageNet100Dataset

        ds = ImageNet100Dataset(root, split)
    elif name == "coco":
        from clt_pipe.datasets.coco import CocoDataset

        ds = CocoDataset(root, split, label_rule=coco_label_rule)
    elif name == "imagefolder":
        from clt_pipe.datasets.imagefolder import ImageFolderDataset

        ds = ImageFolderDataset(root, split)
    elif name == "digits":
        from clt_pipe.datasets.digits import DigitsDataset

        ds = DigitsDataset(split)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    if len(ds) == 0:
        raise DatasetError(f"dataset {name} (split {split!r}, root {root}) has no images")
    return ds
