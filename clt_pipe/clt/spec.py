"""The shape and sparsifier of a CLT: everything needed to rebuild the module before loading weights.

``SPARSIFIERS`` is the one registry of sparsifiers: every other module asks it what a sparsifier is (per-token
TopK or not, AuxK or not, which inference threshold) instead of comparing names; ``CLTSpec`` is the one place
that validates ``k`` and the JumpReLU parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from clt_pipe.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Sparsifier:
    name: str
    topk: bool  # per-token TopK: exactly k (index, value) pairs per token and layer; admits the sparse decode
    signed: bool  # TopK by |pre|, keeping the sign (abs_topk); otherwise ReLU'd values
    auxk: bool  # gets the AuxK dead-latent loss
    uses_k: bool  # k is a sparsity target (all but jumprelu)
    threshold: str | None  # inference threshold on pre-activations: "learned" (STE), "running" (batch average)
    l0_penalty: bool  # trained with an explicit sparsity penalty (l0_coef)
    doc: str

    def circuit_tracer_refusal(self, has_store: bool) -> str | None:
        """Why circuit-tracer (ReLU/JumpReLU CLTs only) cannot faithfully read this sparsifier's CLT, or None."""
        if self.signed:
            return (f"export: an {self.name} CLT has signed codes, which circuit-tracer's ReLU/JumpReLU cannot "
                    "produce; there is no faithful circuit-tracer export of it")
        if self.topk and not has_store:
            return (f"export: circuit-tracer has no TopK and would read this {self.name} CLT as a plain ReLU CLT; "
                    "pass --store STORE to calibrate per-feature JumpReLU thresholds on it")
        return None


SPARSIFIERS: dict[str, Sparsifier] = {s.name: s for s in (
    Sparsifier("relu_topk", topk=True, signed=False, auxk=True, uses_k=True, threshold=None, l0_penalty=False,
               doc="keep the k largest ReLU(pre) per token and layer"),
    Sparsifier("abs_topk", topk=True, signed=True, auxk=True, uses_k=True, threshold=None, l0_penalty=False,
               doc="keep the k largest |pre| per token and layer, with their sign"),
    Sparsifier("jumprelu", topk=False, signed=False, auxk=False, uses_k=False, threshold="learned",
               l0_penalty=True, doc="z = pre * H(pre - θ), θ learned (STE), L0 or tanh penalty"),
    Sparsifier("batchtopk", topk=False, signed=False, auxk=True, uses_k=True, threshold="running",
               l0_penalty=False, doc="B·k largest per layer over the batch; a running threshold at inference"),
)}


def sparsifier(name: str) -> Sparsifier:
    try:
        return SPARSIFIERS[name]
    except KeyError:
        raise ConfigError(f"sparsifier: {name!r} is not one of {', '.join(SPARSIFIERS)}") from None


@dataclass
class CLTSpec:
    n_layers: int
    d_model: int
    n_features: int  # features per layer
    sparsifier: str  # a key of SPARSIFIERS
    k: int  # TopK family: active per token and layer; batchtopk: mean active per token and layer
    dec_bias: bool = False
    jumprelu_threshold: float = 0.03  # initial threshold, standardised units
    jumprelu_bandwidth: float = 0.05  # width of the straight-through rectangle kernel

    def __post_init__(self) -> None:
        kind = sparsifier(self.sparsifier)
        for key in ("n_layers", "d_model", "n_features", "k"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
        if kind.uses_k and self.k >= self.n_features:
            raise ConfigError(f"k: must be smaller than the {self.n_features} features per layer, got {self.k}")
        if self.jumprelu_threshold <= 0 or self.jumprelu_bandwidth <= 0:
            raise ConfigError("jumprelu_threshold/jumprelu_bandwidth: must be > 0")

    @property
    def kind(self) -> Sparsifier:
        return SPARSIFIERS[self.sparsifier]

    @property
    def is_topk(self) -> bool:
        """Per-token TopK codes, which admit the sparse (gather) decode."""
        return self.kind.topk

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
