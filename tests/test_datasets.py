"""Each dataset against a tiny fake of its real on-disk layout."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from clt_pipe.testing.fakedata import make_fake_cifar100, make_fake_coco, make_fake_imagefolder, make_fake_imagenet100
from PIL import Image

from clt_pipe.datasets.base import BadImageError, DatasetError, ImageDataset, shared_zeroshot_data
from clt_pipe.datasets.cifar100 import Cifar100Dataset
from clt_pipe.datasets.coco import CocoDataset, pick_label
from clt_pipe.datasets.imagefolder import ImageFolderDataset
from clt_pipe.datasets.imagenet100 import ImageNet100Dataset, imagenet100_wnids
from clt_pipe.datasets.registry import open_dataset

IMAGENET_ENSEMBLE = shared_zeroshot_data()["imagenet1k"]["templates"]


def _check_templates(ds: ImageDataset, ensemble: list[str]) -> None:
    assert ds.templates["single"] == ["a photo of a {c}."]
    assert ds.templates["ensemble"] == ensemble and len(ensemble) > 1
    assert all("{c}" in t for t in ds.templates["ensemble"])


# ---------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_records_names_and_pixels(tmp_path, split):
    fake = make_fake_cifar100(tmp_path, n_train=12, n_test=7)
    ds = Cifar100Dataset(tmp_path, split)
    want = fake[split]
    assert len(ds) == len(want["labels"])
    assert ds.class_names[:3] == ["apple", "aquarium fish", "baby"] and len(ds.class_names) == 100
    assert [ds.record(i).label for i in range(len(ds))] == want["labels"]
    rec = ds.record(5)
    assert (rec.index, rec.source, rec.labels) == (5, f"{split}#5", ())
    for i in (0, len(ds) - 1):
        im = ds.load_image(i)
        assert im.mode == "RGB" and im.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(im), want["images"][i])
    _check_templates(ds, shared_zeroshot_data()["cifar100"]["templates"])
    assert ds.describe() == {"name": "cifar100", "split": split, "n_images": len(ds), "n_classes": 100}


def test_cifar100_root_may_be_the_pickle_folder(tmp_path):
    fake = make_fake_cifar100(tmp_path, n_train=4, n_test=3, n_classes=10)
    ds = Cifar100Dataset(fake["folder"], "test")
    assert len(ds) == 3 and len(ds.class_names) == 10


def test_cifar100_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        Cifar100Dataset(tmp_path / "nope", "train")
    fake = make_fake_cifar100(tmp_path, n_train=4, n_test=3)
    with pytest.raises(DatasetError, match="split"):
        Cifar100Dataset(tmp_path, "val")
    data = (fake["folder"] / "train").read_bytes()
    (fake["folder"] / "train").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"train is corrupt"):
        Cifar100Dataset(tmp_path, "train")
    (fake["folder"] / "test").unlink()
    with pytest.raises(DatasetError, match=r"test is missing.*cifar-100-python"):
        Cifar100Dataset(tmp_path, "test")


# ---------------------------------------------------------------- ImageNet-100


def test_imagenet100_restricts_classes_and_names(tmp_path):
    fake = make_fake_imagenet100(tmp_path, split="val", per_class=2)
    ds = ImageNet100Dataset(tmp_path, "val")
    wnids = imagenet100_wnids()
    assert wnids == sorted(wnids) and len(set(wnids)) == 100
    assert len(ds) == 200 and len(ds.class_names) == 100  # the tench distractor folder is ignored
    assert not any(fake["extra_wnid"] in ds.record(i).source for i in range(len(ds)))
    # n01749939 is ImageNet class 64, "green mamba"; n02869837 (class 452, "bonnet") must not take its synset text
    assert ds.class_names[wnids.index("n01749939")] == "green mamba"
    assert ds.class_names[wnids.index("n02869837")] == shared_zeroshot_data()["imagenet1k"]["classnames"][452]
    k = wnids.index("n02488291")
    rec = ds.record(2 * k + 1)
    assert rec.label == k and rec.source == "val/n02488291/n02488291_1.JPEG"
    im = ds.load_image(2 * k + 1)
    assert im.mode == "RGB" and im.size == (24, 24)
    _check_templates(ds, IMAGENET_ENSEMBLE)


def test_imagenet100_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageNet100Dataset(tmp_path, "val")
    make_fake_imagenet100(tmp_path, split="val", n_classes=97)
    with pytest.raises(DatasetError, match=r"3 of 100 class folders missing") as e:
        ImageNet100Dataset(tmp_path, "val")
    assert imagenet100_wnids()[97] in str(e.value)
    with pytest.raises(DatasetError, match="split"):
        ImageNet100Dataset(tmp_path, "test")


# ---------------------------------------------------------------- COCO


@pytest.mark.parametrize("rule", ["largest_area", "most_instances", "first_annotation"])
def test_coco_label_rules(tmp_path, rule):
    fake = make_fake_coco(tmp_path, split="val", n_images=6)
    ds = CocoDataset(tmp_path, "val", label_rule=rule)
    assert len(set(map(tuple, fake["expected"].values()))) == 3  # the fake really separates the rules
    assert len(ds) == 5  # the unannotated image is dropped
    assert [ds.record(i).label for i in range(len(ds))] == fake["expected"][rule]
    assert [ds.record(i).labels for i in range(len(ds))] == fake["all_labels"]
    assert [ds.record(i).source for i in range(len(ds))] == [f"val2017/{f}" for f in fake["files"]]


def test_coco_names_images_and_templates(tmp_path):
    fake = make_fake_coco(tmp_path, split="train", n_images=4)
    ds = CocoDataset(tmp_path, "train")
    assert ds.class_names == ["person", "bicycle", "car", "cat", "dog", "toothbrush"] == fake["class_names"]
    assert fake["unannotated"] not in {ds.record(i).source.split("/")[-1] for i in range(len(ds))}
    im = ds.load_image(1)
    assert im.mode == "RGB" and im.size == (48, 40)
    assert np.abs(np.asarray(im, dtype=int) - np.array(fake["colours"][1])).max() <= 4  # JPEG is lossy
    _check_templates(ds, IMAGENET_ENSEMBLE)


def test_pick_label_ties_are_deterministic():
    assert pick_label([(3, 5.0), (1, 5.0)], "largest_area") == 1
    assert pick_label([(3, 5.0), (1, 2.0), (1, 2.0), (3, 1.0)], "most_instances") == 3
    assert pick_label([(4, 1.0), (2, 9.0)], "first_annotation") == 4


def test_coco_errors(tmp_path):
    make_fake_coco(tmp_path, split="val")
    with pytest.raises(DatasetError, match="label rule"):
        CocoDataset(tmp_path, "val", label_rule="biggest")
    with pytest.raises(DatasetError, match="split"):
        CocoDataset(tmp_path, "test")
    with pytest.raises(DatasetError, match=r"train2017 is missing"):
        CocoDataset(tmp_path, "train")
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text()[:100])
    with pytest.raises(DatasetError, match="instances_val2017.json is unreadable"):
        CocoDataset(tmp_path, "val")
    ann.unlink()
    with pytest.raises(DatasetError, match=r"instances_val2017.json is missing"):
        CocoDataset(tmp_path, "val")


def test_coco_missing_image_file_is_a_bad_image(tmp_path):
    fake = make_fake_coco(tmp_path, split="val")
    (tmp_path / "val2017" / fake["files"][0]).unlink()
    ds = CocoDataset(tmp_path, "val")
    with pytest.raises(BadImageError, match=fake["files"][0]):
        ds.load_image(0)
    assert ds.load_image(1).mode == "RGB"


# ---------------------------------------------------------------- image folder


@pytest.mark.parametrize("split", [None, "train"])
def test_imagefolder_with_and_without_split_folder(tmp_path, split):
    classes = ("zebra", "golden_retriever")
    fake = make_fake_imagefolder(tmp_path, classes=classes, per_class=3, split=split, size=20)
    (fake["base"] / "zebra" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, "train")
    assert ds.class_names == ["golden retriever", "zebra"]
    assert len(ds) == 6
    assert [ds.record(i).label for i in range(6)] == fake["labels"] == [0, 0, 0, 1, 1, 1]
    prefix = "train/" if split else ""
    assert ds.record(4).source == f"{prefix}zebra/001.png"
    for i in (0, 5):
        im = ds.load_image(i)
        assert im.mode == "RGB" and im.size == (20, 20)
        np.testing.assert_array_equal(np.asarray(im), fake["arrays"][i])
    _check_templates(ds, IMAGENET_ENSEMBLE)


def test_imagefolder_converts_to_rgb_and_names_unreadable_files(tmp_path):
    make_fake_imagefolder(tmp_path, classes=("a",), per_class=1)
    Image.new("L", (9, 7), 200).save(tmp_path / "a" / "grey.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = ImageFolderDataset(tmp_path, "val")
    sources = [ds.record(i).source for i in range(len(ds))]
    assert sources == ["a/000.png", "a/broken.jpg", "a/grey.png"]
    grey = ds.load_image(2)
    assert grey.mode == "RGB" and grey.size == (9, 7) and grey.getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(BadImageError, match="broken.jpg"):
        ds.load_image(1)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", "train")
    with pytest.raises(DatasetError, match="no class folders"):
        ImageFolderDataset(tmp_path, "train")


# ---------------------------------------------------------------- registry


def test_registry_dispatch(tmp_path):
    make_fake_cifar100(tmp_path / "c", n_train=3, n_test=2)
    make_fake_imagefolder(tmp_path / "f", per_class=2)
    make_fake_coco(tmp_path / "coco", split="val")
    make_fake_imagenet100(tmp_path / "in", split="train")
    assert isinstance(open_dataset("cifar100", tmp_path / "c", "test"), Cifar100Dataset)
    assert len(open_dataset("imagefolder", str(tmp_path / "f"), "train")) == 4
    assert isinstance(open_dataset("imagenet100", tmp_path / "in", "train"), ImageNet100Dataset)
    coco = open_dataset("coco", tmp_path / "coco", "val", coco_label_rule="first_annotation")
    assert isinstance(coco, CocoDataset) and coco.label_rule == "first_annotation"


def test_registry_digits_is_lazy_and_ignores_root(tmp_path, monkeypatch):
    class FakeDigits(ImageDataset):
        name, class_names, templates = "digits", [str(d) for d in range(10)], {}

        def __init__(self, split, seed=0):
            self.split = split

        def __len__(self):
            return 3

    module = type(sys)("clt_pipe.datasets.digits")
    module.DigitsDataset = FakeDigits
    monkeypatch.setitem(sys.modules, "clt_pipe.datasets.digits", module)
    ds = open_dataset("digits", tmp_path / "ignored", "test")
    assert isinstance(ds, FakeDigits) and ds.split == "test"


def test_registry_opens_the_real_digits_dataset(tmp_path):
    pytest.importorskip("sklearn")
    ds = open_dataset("digits", tmp_path / "ignored", "train")
    assert ds.name == "digits" and len(ds) > 0 and ds.load_image(0).mode == "RGB"


def test_registry_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        open_dataset("mnist", tmp_path, "train")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no images"):
        open_dataset("imagefolder", tmp_path / "empty", "train")
    with pytest.raises(DatasetError, match="split"):
        open_dataset("cifar100", tmp_path, "validation")
    fake = make_fake_cifar100(tmp_path / "c", n_train=0, n_test=2)
    assert fake["train"]["labels"] == []
    with pytest.raises(DatasetError, match="has no images"):
        open_dataset("cifar100", tmp_path / "c", "train")

