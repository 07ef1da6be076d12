"""Attribution graphs of single images (``clt-pipe graph``), circuit-tracer's method for a CLIP ViT.

* ``replacement`` — the ViT at one image and its affine replacement model (patterns, LayerNorm scales and the
                    embedding's norm frozen; MLPs = CLT writes + error), forward and transposed, batched.
* ``attribution`` — nodes, direct-effect edges, the completeness check.
* ``prune``       — influence on the target, circuit-tracer's pruning, the strongest paths.
* ``ctfiles``     — circuit-tracer's own graph files (``graph.pt``, the viewer's JSON).
* ``page``        — our self-contained page beside the atlas.
* ``run``         — the command's entry point.
"""
