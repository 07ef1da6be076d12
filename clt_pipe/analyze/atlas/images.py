"""Thumbnail pixels for the atlas, found through the store's ``images.parquet`` provenance.

The dataset is opened as analyze's retrieval grids open it (``--data-root``, else the root recorded in the
store); an image is shown only when the dataset's record at that index names the same ``source`` as the
store's ``images.parquet`` row — other data under the same root would draw the wrong pictures. When the
dataset cannot be opened, the atlas renders everything but the thumbnails and says why.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from clt_pipe.errors import CltPipeError
from clt_pipe.store import format as SF


class ThumbnailSource:
    """``pixels(i, px)`` → [px, px, 3] uint8 or None; ``reason`` says why images are missing (or None)."""

    def __init__(self, store, images: list[int], data_root: str = "", dataset=None):
        self.dataset, self.reason = dataset, None
        ds = store.meta.dataset
        if self.dataset is None:
            from clt_pipe.datasets.registry import open_dataset

            root = data_root or ds.data_root or ""
            try:
                self.dataset = open_dataset(ds.name, root, ds.split,
                                            coco_label_rule=ds.coco_label_rule or "largest_area")
            except CltPipeError as e:
                self.reason = f"dataset {ds.name}/{ds.split} not reachable at {root or '(no data root)'}: {e}"
        try:
            self.sources = _sources(store, images)
        except Exception as e:  # noqa: BLE001 - any unreadable provenance means: no thumbnails
            self.sources, self.dataset = {}, None
            self.reason = f"images.parquet unreadable: {e}"
        self.mismatched: list[int] = []

    def pixels(self, i: int, px: int) -> np.ndarray | None:
        if self.dataset is None:
            return None
        try:
            if i >= len(self.dataset) or self.dataset.record(i).source != self.sources.get(i):
                self.mismatched.append(i)
                return None
            img = self.dataset.load_image(i).convert("RGB")
        except CltPipeError:
            self.mismatched.append(i)
            return None
        return center_square(img, px)

    def problems(self) -> str | None:
        if self.reason:
            return self.reason
        if self.mismatched:
            return (f"{len(self.mismatched)} image(s) (e.g. #{self.mismatched[0]}) are not the store's images "
                    f"(source differs from images.parquet) or could not be read; shown without pixels")
        return None


def _sources(store, images: list[int]) -> dict[int, str]:
    """images.parquet ``source`` of the given images only (row-group filtered read, not the whole column)."""
    import pyarrow.parquet as pq

    if not images:
        return {}
    with store.loc.fs.open(store.loc.path(SF.IMAGES_PARQUET), "rb") as fh:
        t = pq.read_table(fh, columns=["image", "source"], filters=[("image", "in", [int(i) for i in images])])
    return dict(zip(t.column("image").to_pylist(), t.column("source").to_pylist()))


def center_square(img: Image.Image, px: int) -> np.ndarray:
    """open_clip's default geometry: resize the short side to ``px``, centre-crop a square."""
    w, h = img.size
    s = px / min(w, h)
    img = img.resize((max(px, round(w * s)), max(px, round(h * s))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - px) // 2, (h - px) // 2
    return np.asarray(img.crop((left, top, left + px, top + px)), np.uint8)
