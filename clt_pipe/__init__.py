"""clt-pipe: Cross-Layer Transcoders for CLIP Vision Transformers."""

__version__ = "0.1.0"
