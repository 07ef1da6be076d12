"""The store's root metadata (``clt_pipe_store`` attribute, storage/FORMAT.md) as typed, frozen records.

``to_dict`` gives exactly the JSON the writer stores (same keys, same order), ``from_dict`` reads it back:
``StoreMeta.from_dict(m.to_dict()) == m``. A key that a store does not hold (written by an older writer, or
optional like ``activations.targets``) stays absent (``ABSENT``) rather than becoming ``None``; keys this
version does not know are kept in ``extra`` so nothing a newer writer stored is lost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from clt_pipe.store import format as F
from clt_pipe.tokens import TokenPolicy


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self


ABSENT: Any = _Absent()  # the key is not in the stored JSON


def _fields(obj) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj) if f.name != "extra"]


class _Record:
    """Typed fields in stored order; ABSENT ones are left out; unknown stored keys ride along in ``extra``."""

    extra: Mapping[str, Any]

    def to_dict(self) -> dict:
        out = {}
        for f in _fields(self):
            v = getattr(self, f.name)
            if v is not ABSENT:
                out[f.name] = v.to_dict() if hasattr(v, "to_dict") else v
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        return cls._from_fields(d)

    @classmethod
    def _from_fields(cls, d: Mapping[str, Any]):
        names = {f.name for f in _fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


@dataclass(frozen=True)
class BackboneIdentity(_Record):
    """What identifies the ViT a store was harvested with (``Backbone.identity``; the ``model`` section)."""

    name: str
    model_arg: str
    pretrained: str
    weights_sha256: str
    activation: str
    n_layers: int
    d_model: int
    d_mlp: int
    embed_dim: int
    image_size: int | list[int]
    patch_size: int | list[int]
    n_positions: int
    logit_scale: float
    ln_eps: float = ABSENT
    ls_identity: bool = ABSENT
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def image_hw(self) -> tuple[int, int]:
        img = self.image_size
        return tuple(img) if isinstance(img, (list, tuple)) else (img, img)


@dataclass(frozen=True)
class DatasetInfo(_Record):
    name: str
    split: str
    n_images: int
    class_names: list[str]
    data_root: str
    coco_label_rule: str | None = ABSENT
    sources_sha256: str = ABSENT
    content_sha256: str | None = ABSENT  # absent in stores written before data identity was checked on resume
    extra: Mapping[str, Any] = field(default_factory=dict)

    def without_class_names(self) -> dict:
        """The section as run.json and report.json copy it (the class list lives in the store)."""
        return {k: v for k, v in self.to_dict().items() if k != "class_names"}


@dataclass(frozen=True)
class TokenSelection(_Record):
    policy: TokenPolicy
    tokens_per_image: int
    seed: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"policy": str(self.policy), "k": self.policy.k, "tokens_per_image": self.tokens_per_image,
                "seed": self.seed, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TokenSelection":
        rest = {k: v for k, v in d.items() if k not in ("policy", "k", "tokens_per_image", "seed")}
        return cls(TokenPolicy.parse(d["policy"]), d["tokens_per_image"], d["seed"], extra=rest)


@dataclass(frozen=True)
class Activations(_Record):
    dtype: str  # fp16 | bf16
    storage_dtype: str
    compressor: str
    forward_precision: str = ABSENT  # absent in stores written before it was part of the identity
    targets: str = ABSENT  # "recompute" in v2 stores only, so stored-target identities stay as they were
    mlp_activation: str = ABSENT  # v2 only
    mlp_in: str = ""
    mlp_out: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def recompute(self) -> bool:
        return self.targets == "recompute"


@dataclass(frozen=True)
class StoreMeta(_Record):
    model: BackboneIdentity
    preprocess: dict
    dataset: DatasetInfo
    templates: dict[str, list[str]]
    tokens: TokenSelection
    activations: Activations
    layout: F.StoreLayout
    # Set by the writer:
    format_version: int = ABSENT
    fingerprint: str = ABSENT
    created: str = ABSENT
    tool_version: str = ABSENT
    initialised: bool = ABSENT
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoreMeta":
        sections = {"model": BackboneIdentity, "dataset": DatasetInfo, "tokens": TokenSelection,
                    "activations": Activations}
        typed = {k: sections[k].from_dict(v) if k in sections else v for k, v in d.items()}
        typed["layout"] = F.StoreLayout(**d["layout"])
        return cls._from_fields(typed)

    @property
    def recompute(self) -> bool:
        """True for a v2 store: mlp_out is not stored but recomputed from mlp_in and the stored MLP weights."""
        return self.activations.recompute

    @property
    def activation_arrays(self) -> tuple[str, ...]:
        """The activation arrays the store holds: both, or only mlp_in when its targets are recomputed."""
        return (F.MLP_IN,) if self.recompute else F.ACTIVATION_ARRAYS

    def replace(self, **changes) -> "StoreMeta":
        return dataclasses.replace(self, **changes)
