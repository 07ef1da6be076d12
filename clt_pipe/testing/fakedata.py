"""Tiny on-disk fakes of the real dataset layouts, for any test that needs a dataset root.

Every image is seeded noise (or, for lossy JPEGs, a flat colour per image) so tests can tell them apart.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_FIRST_NAMES = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle"]


def noise_image(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def make_fake_cifar100(root, n_train: int = 20, n_test: int = 10, seed: int = 0, n_classes: int = 100) -> dict:
    """``root/cifar-100-python/{train,test,meta}`` in the real pickle format.

    Returns ``{"root", "folder", "class_names" (raw, with underscores), "train"/"test": {"images" [N,32,32,3],
    "labels"}}``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    names = (CIFAR_FIRST_NAMES + [f"class_{k:03d}" for k in range(len(CIFAR_FIRST_NAMES), n_classes)])[:n_classes]
    out: dict = {"root": Path(root), "folder": folder, "class_names": names}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, n_classes, size=n)]
        d = {
            b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),  # R plane, G plane, B plane
            b"fine_labels": labels,
            b"coarse_labels": [x // 5 for x in labels],
            b"filenames": [f"img_{k}.png".encode() for k in range(n)],
        }
        with open(folder / split, "wb") as f:
            pickle.dump(d, f)
        out[split] = {"images": images, "labels": labels}
    meta = {
        b"fine_label_names": [s.encode() for s in names],
        b"coarse_label_names": [b"c%d" % k for k in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return out


def make_fake_imagefolder(
    root, classes=("cat", "dog"), per_class: int = 3, split=None, size: int = 40, seed: int = 0
) -> dict:
    """``root/[<split>/]<class>/<k>.png`` (lossless, so pixels round-trip exactly).

    Returns ``{"root", "base", "paths", "labels", "arrays"}`` in the dataset's order (sorted classes).
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / split if split else Path(root)
    out: dict = {"root": Path(root), "base": base, "paths": [], "labels": [], "arrays": []}
    for label, cls in enumerate(sorted(classes)):
        (base / cls).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            arr = noise_image(rng, size)
            path = base / cls / f"{k:03d}.png"
            Image.fromarray(arr).save(path)
            out["paths"].append(path)
            out["labels"].append(label)
            out["arrays"].append(arr)
    return out


def make_fake_imagenet100(
    root, split: str = "val", per_class: int = 1, n_classes: int = 100, size: int = 24
) -> dict:
    """``root/<split>/<wnid>/*.JPEG`` for the first ``n_classes`` ImageNet-100 wnids (sorted), plus one
    distractor folder of a non-ImageNet-100 class (tench) that the dataset must ignore.

    Returns ``{"root", "wnids" (sorted, those written), "extra_wnid", "paths"}``.
    """
    from clt_pipe.datasets.imagenet100 import imagenet100_wnids

    rng = np.random.default_rng(0)
    wnids = imagenet100_wnids()[:n_classes]
    extra = "n01440764"
    paths = []
    for w in wnids + [extra]:
        d = Path(root) / split / w
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            path = d / f"{w}_{k}.JPEG"
            Image.fromarray(noise_image(rng, size)).save(path, format="JPEG")
            if w != extra:
                paths.append(path)
    return {"root": Path(root), "wnids": wnids, "extra_wnid": extra, "paths": paths}


# (id, name) in a shuffled order with the real, non-contiguous COCO ids
COCO_CATEGORIES = [(18, "dog"), (1, "person"), (90, "toothbrush"), (3, "car"), (17, "cat"), (2, "bicycle")]


def make_fake_coco(root, split: str = "val", n_images: int = 6) -> dict:
    """``root/{split}2017/*.jpg`` + ``root/annotations/instances_{split}2017.json``.

    Image ids are written out of order; the last image has no annotation. Image ``A`` (smallest id) makes
    the three label rules disagree, image ``B`` has a most_instances tie broken by area.
    Returns ``{"root", "class_names", "files", "expected": {rule: labels}, "all_labels", "colours",
    "unannotated"}``, lists in dataset order (image id).
    """
    assert n_images >= 3
    root = Path(root)
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ids = sorted(COCO_CATEGORIES)
    lab = {name: k for k, (_, name) in enumerate(ids)}  # label = position among sorted ids
    cid = {name: i for i, name in COCO_CATEGORIES}
    image_ids = [100 + 7 * k for k in range(n_images)]
    files = [f"{i:012d}.jpg" for i in image_ids]
    colours = [((37 * k) % 256, (91 * k + 50) % 256, (173 * k + 20) % 256) for k in range(n_images)]
    for f, c in zip(files, colours):
        Image.new("RGB", (48, 40), c).save(img_dir / f, quality=95)

    anns_per_image: list[list[tuple[str, float]]] = [
        # A: first -> cat; most instances -> dog (3 x 50); largest area -> person (400)
        [("cat", 100), ("dog", 50), ("dog", 50), ("dog", 50), ("person", 400)],
        # B: 2 cars (20 total) vs 2 bicycles (60 total): most_instances tie -> bicycle; first -> car
        [("car", 10), ("bicycle", 30), ("car", 10), ("bicycle", 30)],
    ]
    names = [n for _, n in COCO_CATEGORIES]
    for k in range(2, n_images - 1):
        anns_per_image.append([(names[k % len(names)], 10.0 * k)])
    anns_per_image.append([])  # no annotation -> excluded

    annotations, ann_id = [], 1
    for img_id, anns in zip(image_ids, anns_per_image):
        for name, area in anns:
            side = float(area) ** 0.5
            annotations.append({"id": ann_id, "image_id": img_id, "category_id": cid[name], "area": float(area),
                                "bbox": [1.0, 2.0, side, side], "iscrowd": 0})
            ann_id += 1
    images = [{"id": i, "file_name": f, "width": 48, "height": 40} for i, f in zip(image_ids, files)]
    coco = {
        "info": {"description": "fake"},
        "images": images[::-1],  # out of id order on purpose
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATEGORIES],
    }
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))

    kept = [k for k in range(n_images) if anns_per_image[k]]
    single = [lab[anns_per_image[k][0][0]] for k in kept[2:]]
    expected = {
        "largest_area": [lab["person"], lab["bicycle"], *single],
        "most_instances": [lab["dog"], lab["bicycle"], *single],
        "first_annotation": [lab["cat"], lab["car"], *single],
    }
    return {
        "root": root,
        "class_names": [n for _, n in ids],
        "files": [files[k] for k in kept],
        "colours": [colours[k] for k in kept],
        "expected": expected,
        "all_labels": [tuple(sorted({lab[n] for n, _ in anns_per_image[k]})) for k in kept],
        "unannotated": files[-1],
    }
