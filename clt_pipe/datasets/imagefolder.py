"""Generic ``root/[<split>/]<class>/*`` image folders, plus the file helpers the other folder datasets share."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from clt_pipe.datasets.base import (
    SINGLE_TEMPLATE,
    BadImageError,
    DatasetError,
    ImageDataset,
    ImageRecord,
    shared_zeroshot_data,
)


def imagenet_templates() -> dict[str, list[str]]:
    """CLIP's 80-prompt ImageNet ensemble: a sensible default for natural-image datasets without their own."""
    return {"single": [SINGLE_TEMPLATE], "ensemble": list(shared_zeroshot_data()["imagenet1k"]["templates"])}


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, like torchvision), sorted so the order is OS-independent."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def open_rgb(path: Path) -> Image.Image:
    """Decode one file; PIL raises many unrelated exception types on bad input, so all of them name the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - see docstring
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


class ClassFolders(ImageDataset):
    """Images listed from one folder per class; label = position of the folder in ``class_dirs``."""

    def _index(self, class_dirs: list[Path]) -> None:
        self._paths: list[Path] = []
        self._labels: list[int] = []
        for label, d in enumerate(class_dirs):
            files = list_images(d)
            self._paths += files
            self._labels += [label] * len(files)

    def __len__(self) -> int:
        return len(self._paths)

    def record(self, i: int) -> ImageRecord:
        return ImageRecord(i, self._paths[i].relative_to(self.root).as_posix(), self._labels[i])

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def data_files(self, n: int) -> list[Path]:
        return self._paths[:n]


# Folder names that mean a split, not a class: root/<one of these>/ marks the root/<split>/<class>/* layout.
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "dev", "eval"}


class ImageFolderDataset(ClassFolders):
    """``root/<split>/<class>/*`` when that split folder exists, else ``root/<class>/*``; classes sorted by name.

    Class names are the folder names with ``_`` read as a space; templates are the ImageNet ensemble.
    """

    name = "imagefolder"

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(f"imagefolder root {self.root} does not exist (expected root/[<split>/]<class>/*)")
        base = self.root / split if (self.root / split).is_dir() else self.root
        splits_here = sorted(d.name for d in self.root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES)
        if base == self.root and splits_here:  # root/<split>/<class>/* without the wanted split: not classes
            raise DatasetError(f"imagefolder {self.root} has no {split!r} split folder (it has: "
                               f"{', '.join(splits_here)}); pass --split {splits_here[0]} or add {self.root / split}")
        class_dirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise DatasetError(f"imagefolder {base} has no class folders (expected root/[<split>/]<class>/*)")
        self.class_names = [d.name.replace("_", " ") for d in class_dirs]
        self.templates = imagenet_templates()
        self._index(class_dirs)
