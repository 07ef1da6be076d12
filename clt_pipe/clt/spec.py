"""The shape and sparsifier of a CLT: everything needed to rebuild the module before loading weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from clt_pipe.errors import CheckpointError, ConfigError

SPARSIFIERS = ("relu_topk", "abs_topk", "jumprelu", "batchtopk")
TOPK_FAMILY = ("relu_topk", "abs_topk")  # per-token TopK: exactly k (index, value) pairs per token and layer
AUXK_FAMILY = ("relu_topk", "abs_topk", "batchtopk")  # sparsifiers that get the AuxK dead-latent loss


@dataclass
class CLTSpec:
    n_layers: int
    d_model: int
    n_features: int  # features per layer
    sparsifier: str  # relu_topk | abs_topk | jumprelu | batchtopk
    k: int  # TopK family: active per token and layer; batchtopk: mean active per token and layer
    dec_bias: bool = False
    jumprelu_threshold: float = 0.03  # initial threshold, standardised units
    jumprelu_bandwidth: float = 0.05  # width of the straight-through rectangle kernel

    def __post_init__(self) -> None:
        if self.sparsifier not in SPARSIFIERS:
            raise ConfigError(f"sparsifier: {self.sparsifier!r} is not one of {', '.join(SPARSIFIERS)}")
        for key in ("n_layers", "d_model", "n_features", "k"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
        if self.sparsifier != "jumprelu" and self.k >= self.n_features:
            raise ConfigError(f"k: must be smaller than n_features={self.n_features}, got {self.k}")
        if self.jumprelu_threshold <= 0 or self.jumprelu_bandwidth <= 0:
            raise ConfigError("jumprelu_threshold/jumprelu_bandwidth: must be > 0")

    @property
    def is_topk(self) -> bool:
        """Per-token TopK codes, which admit the sparse (gather) decode."""
        return self.sparsifier in TOPK_FAMILY

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLTSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"CLT spec: unknown key(s) {', '.join(unknown)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise CheckpointError(f"CLT spec: missing key(s) {', '.join(missing)}")
        try:
            return cls(**dict(d))
        except ConfigError as e:
            raise CheckpointError(f"CLT spec: {e}") from None
