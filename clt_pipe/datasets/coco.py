"""COCO 2017 images with one zero-shot label per image derived from the instance annotations."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from PIL import Image

from clt_pipe.datasets.base import DatasetError, ImageDataset, ImageRecord
from clt_pipe.datasets.imagefolder import imagenet_templates, open_rgb

SPLITS = ("train", "val")
LABEL_RULES = ("largest_area", "most_instances", "first_annotation")
LAYOUT = "root/{train2017,val2017}/*.jpg and root/annotations/instances_{train,val}2017.json"


def pick_label(anns: list[tuple[int, float]], rule: str) -> int:
    """The single label of one image from its ``(label, area)`` annotations in file order.

    Ties left by a rule go to the smaller label index, so the result never depends on dict order.
    """
    if rule == "first_annotation":
        return anns[0][0]
    area: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    for label, a in anns:
        area[label] += a
        count[label] += 1
    if rule == "largest_area":
        return min(area, key=lambda c: (-area[c], c))
    return min(area, key=lambda c: (-count[c], -area[c], c))  # most_instances, ties -> larger area


class CocoDataset(ImageDataset):
    """COCO ``train``/``val`` 2017, images in image-id order.

    Images without any instance annotation are left out: they have no label to score zero-shot against.
    ``labels`` holds every category present (crowd annotations included); ``label`` follows ``label_rule``.
    Label index = position of the category id in the sorted category ids (0..79 for COCO's 80 of 1..90).
    """

    name = "coco"

    def __init__(self, root: str | Path, split: str, label_rule: str = "largest_area"):
        if split not in SPLITS:
            raise DatasetError(f"coco split must be one of {SPLITS}, got {split!r}")
        if label_rule not in LABEL_RULES:
            raise DatasetError(f"coco label rule must be one of {LABEL_RULES}, got {label_rule!r}")
        self.root, self.split, self.label_rule = Path(root), split, label_rule
        self._image_dir = self.root / f"{split}2017"
        ann_path = self.root / "annotations" / f"instances_{split}2017.json"
        for p in (self.root, self._image_dir, ann_path):
            if not p.exists():
                raise DatasetError(f"COCO: {p} is missing; expected {LAYOUT}")
        try:
            with open(ann_path, encoding="utf-8") as f:
                coco = json.load(f)
            categories = sorted(coco["categories"], key=lambda c: c["id"])
            images = sorted(coco["images"], key=lambda im: im["id"])
            class_names = [c["name"] for c in categories]
            label_of = {c["id"]: k for k, c in enumerate(categories)}
            per_image: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for a in coco["annotations"]:
                area = a["area"] if a.get("area") is not None else a["bbox"][2] * a["bbox"][3]
                per_image[a["image_id"]].append((label_of[a["category_id"]], float(area)))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise DatasetError(f"COCO annotation file {ann_path} is unreadable: {type(e).__name__}: {e}") from e

        self.class_names = class_names
        self.templates = imagenet_templates()

        self._files: list[str] = []
        self._labels: list[int] = []
        self._all_labels: list[tuple[int, ...]] = []
        for im in images:
            anns = per_image.get(im["id"])
            if not anns:
                continue
            self._files.append(im["file_name"])
            self._labels.append(pick_label(anns, label_rule))
            self._all_labels.append(tuple(sorted({label for label, _ in anns})))

    def __len__(self) -> int:
        return len(self._files)

    def record(self, i: int) -> ImageRecord:
        return ImageRecord(i, f"{self.split}2017/{self._files[i]}", self._labels[i], self._all_labels[i])

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._image_dir / self._files[i])

    def data_files(self, n: int) -> list[Path]:
        return [self._image_dir / f for f in self._files[:n]]
