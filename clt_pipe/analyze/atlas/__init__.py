"""The feature atlas: a static HTML view of single CLT features (``clt-pipe atlas`` and analyze's ``atlas`` part).

* ``scan``    — one streamed pass over the store: firing statistics and a bounded top-k of images per feature,
                then a targeted re-read of the chunks that hold the shown features' top images (heatmaps).
* ``effects`` — what a feature writes: decoder footprint per target layer and its direct zero-shot logit effect.
* ``images``  — thumbnails from the dataset through the store's ``images.parquet`` provenance.
* ``render``  — heatmap PNGs, inline SVG bar plots, the HTML pages.
* ``run``     — selection of the shown features and the entry points.
"""
