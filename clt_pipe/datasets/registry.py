"""Dataset name -> implementation, the one place the pipeline opens datasets."""

from __future__ import annotations

from pathlib import Path

from clt_pipe.datasets.base import DatasetError, ImageDataset

NAMES = ("cifar100", "imagenet100", "coco", "imagefolder", "digits")


def check_root(name: str, root: str | Path, split: str) -> None:
    """The cheap part of ``open_dataset``: the split name and the root's layout, without listing or decoding.

    Raises the ``DatasetError`` that opening would raise, so a stage can fail on it before loading a model.
    """
    import importlib

    if name not in NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    # imagefolder: any split folder, or none (and its module would import torchvision just for this)
    module = None if name == "imagefolder" else importlib.import_module(f"clt_pipe.datasets.{name}")
    splits = getattr(module, "SPLITS", None)
    if splits is not None and split not in splits:
        raise DatasetError(f"{name} split must be one of {splits}, got {split!r}")
    if name == "digits":
        return
    layout = getattr(module, "LAYOUT", "root/[<split>/]<class>/*")
    if not str(root):
        raise DatasetError(f"{name} needs --data-root, the folder holding {layout}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{name} root {root} does not exist or is not a folder; expected {layout}")
    if name == "cifar100":
        folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        need = [folder / split, folder / "meta"]
    elif name == "imagenet100":
        need = [root / split]
    elif name == "coco":
        need = [root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"]
    else:
        base = root / split if (root / split).is_dir() else root
        if not any(e.is_dir() for e in base.iterdir()):
            raise DatasetError(f"imagefolder {base} has no class folders; expected {layout}")
        need = []
    for p in need:
        if not p.exists():
            raise DatasetError(f"{name}: {p} is missing; expected {layout}")


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
