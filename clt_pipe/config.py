"""Typed configuration for every stage.

Precedence: dataclass defaults < TOML file (one table per stage) < CLI flags that were given explicitly.
Unknown keys and ill-typed values raise ``ConfigError`` naming the offending key, so a typo in a pipeline file
never silently falls back to a default. Configs are frozen: a variant is ``dataclasses.replace(cfg, ...)``, so a
validated config never changes under the code that checked it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from clt_pipe.clt.spec import SPARSIFIERS, CLTSpec
from clt_pipe.errors import ConfigError
from clt_pipe.tokens import TokenPolicy, token_type

DEFAULT_STORE_ROOT = "storage/stores"
ANALYZE_PARTS = ("fidelity", "attribution", "zeroshot", "openloop", "closedloop", "ablation", "retrieval", "atlas",
                 "graphs")
ABLATION_RANKS = ("attribution", "final_layer", "fvu")
ABLATION_MODES = ("features", "true", "zero")
ABLATION_PROTOCOLS = ("replacement", "real")
FEATURE_RE = re.compile(r"^\d+:\d+$")
# AdamW moves every weight by about lr per step; the CLT's weights live in standardised units of order 1, so a
# peak lr above 1 can only diverge. Refused up front rather than found as a NaN loss after the first step.
MAX_LR = 1.0


def opt(default: Any, help: str, factory: bool = False) -> Any:
    """A config field with the help text that the CLI shows for its --option."""
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True)
class HarvestConfig:
    """`clt-pipe harvest`: run a CLIP ViT over a dataset and write the activation store."""

    model: str = opt("ViT-B-32", 'open_clip model name, or a path to an open_clip model-config JSON')
    pretrained: str = opt("openai", 'open_clip pretrained tag, a local checkpoint path, or "none" (random init)')
    dataset: str = opt("cifar100", 'cifar100 | imagenet100 | coco | imagefolder | digits')
    data_root: str = opt("", 'Dataset root folder (layout per dataset: see README)')
    split: str = opt("train", 'Dataset split (train|test for cifar100/digits, train|val for imagenet100/coco)')
    store: str = opt(f"{DEFAULT_STORE_ROOT}/default.zarr", 'Store: local path or fsspec URL (s3://bucket/key)')
    tokens: str = opt("all", 'cls | patches | all | cls+K (CLS plus K random patches per image)')
    dtype: str = opt("fp16", 'fp16 | bf16 (bf16 is stored as its uint16 bit pattern, see storage/FORMAT.md)')
    compressor: str = opt("blosc-lz4-bitshuffle",
                          'none | blosc-lz4-bitshuffle | blosc-lz4-shuffle | blosc-zstd-bitshuffle')
    chunk_mb: float = opt(16.0, 'target uncompressed chunk size along the token axis')
    chunks_per_shard: int = opt(4, 'a shard (commit unit) is this many chunks')
    batch_size: int = opt(64, 'Images (harvest/analyze) or token rows (fit) per batch')
    device: str = opt("auto", 'auto | cpu | cuda | cuda:N')
    precision: str = opt("auto", 'auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16')
    limit: int = opt(0, '0 = every image of the split')
    seed: int = opt(0, 'picks the random patches of cls+K')
    template_sets: list[str] = opt(lambda: ["single", "ensemble"],
                                   'Zero-shot template sets embedded in the store (comma-separated)', factory=True)
    coco_label_rule: str = opt("largest_area", 'largest_area | most_instances | first_annotation')
    on_bad_image: str = opt("fail", 'fail | skip (skipped images are recorded, their rows stay NaN)')
    data_workers: int = opt(2, 'threads decoding/preprocessing images')
    targets: str = opt("stored", 'stored | recompute: keep mlp_out, or keep every MLP\'s weights and recompute '
                                 'mlp_out from mlp_in when reading (half the bytes; store format v2)')
    write_threads: int = opt(0, 'chunks compressed and written concurrently (0 = one per CPU core, at most 8); '
                                'up to twice that many full chunks wait in memory, per writer process')
    overwrite: bool = opt(False, 'Replace an existing store/run of different settings')
    data_moved: bool = opt(False, 'Resume a store from another --data-root than it was harvested from (the data '
                                  'moved); its images must still be the same files with the same content')
    dry_run: bool = opt(False, 'Print the planned bytes, shards and time estimate, write nothing')
    workers: int = opt(0, '>0: a dask LocalCluster of this many workers writes disjoint shard ranges')
    scheduler: str = opt("", 'address of an existing dask scheduler (overrides workers)')

    def validate(self) -> None:
        TokenPolicy.parse(self.tokens)
        _check_choice("dtype", self.dtype, ("fp16", "bf16"))
        _check_choice(
            "compressor",
            self.compressor,
            ("none", "blosc-lz4-bitshuffle", "blosc-lz4-shuffle", "blosc-zstd-bitshuffle"),
        )
        _check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_choice("targets", self.targets, ("stored", "recompute"))
        _check_choice("on_bad_image", self.on_bad_image, ("fail", "skip"))
        _check_choice("coco_label_rule", self.coco_label_rule, ("largest_area", "most_instances", "first_annotation"))
        _check_choice("dataset", self.dataset, ("cifar100", "imagenet100", "coco", "imagefolder", "digits"))
        _check_positive("batch_size", self.batch_size)
        _check_positive("chunk_mb", self.chunk_mb)
        _check_positive("chunks_per_shard", self.chunks_per_shard)
        _check_positive("limit", self.limit, allow_zero=True)
        _check_positive("workers", self.workers, allow_zero=True)
        if not self.store:
            raise ConfigError("store: a store URL or path is required")
        if not self.template_sets:
            raise ConfigError("template_sets: name at least one template set (e.g. single)")


@dataclass(frozen=True)
class FitConfig:
    """`clt-pipe fit`: train a CLT on a committed store."""

    store: str = opt(f"{DEFAULT_STORE_ROOT}/default.zarr", 'Store: local path or fsspec URL')
    out: str = opt("runs/clt", 'Output directory')
    sparsifier: str = opt("relu_topk", ' | '.join(SPARSIFIERS))
    k: int = opt(32, 'active features per layer and token (TopK family)')
    expansion: int = opt(8, 'features per layer = expansion * d_model (unless n_features is set)')
    n_features: int = opt(0, 'Features per layer (overrides expansion; 0 = expansion * d_model)')
    dec_bias: bool = opt(False, 'off: attribution columns then sum to exactly 1')
    steps: int = opt(2000, 'Optimiser steps')
    batch_size: int = opt(1024, 'Images (harvest/analyze) or token rows (fit) per batch')
    lr: float = opt(2e-4, 'Peak learning rate (AdamW)')
    warmup_steps: int = opt(100, 'Linear warm-up steps')
    decay: str = opt("cosine", 'cosine | linear | none (after warm-up, down to lr * min_lr_ratio)')
    min_lr_ratio: float = opt(0.1, 'Final learning rate as a fraction of lr')
    weight_decay: float = opt(0.0, 'AdamW weight decay')
    grad_clip: float = opt(1.0, 'Clip the gradient norm to this (0 = off)')
    aux_k: int = opt(256, 'AuxK: dead latents used to model the residual (TopK family); 0 disables')
    aux_coef: float = opt(1.0 / 32, 'Weight of the AuxK loss')
    dead_tokens: int = opt(200_000, 'a latent is dead after this many tokens without firing')
    l0_coef: float = opt(1e-3, 'JumpReLU sparsity penalty weight')
    l0_penalty: str = opt("l0", 'l0 | tanh')
    tanh_scale: float = opt(4.0, 'Scale inside the tanh sparsity penalty')
    jumprelu_threshold: float = opt(0.03, 'initial JumpReLU threshold (standardised units)')
    jumprelu_bandwidth: float = opt(0.05, 'straight-through estimator kernel width')
    tokens: str = opt("all", 'train on cls | patches | all rows of the store')
    holdout: float = opt(0.0, 'fraction of chunks (whole images) held out from training')
    shuffle_chunks: int = opt(0, 'shuffle window, in chunks (0 = auto: enough chunks for 1.5 x batch_size images, '
                                 'within shuffle_memory)')
    shuffle_memory: float = opt(0.0, 'GiB for the two resident shuffle windows (0 = auto: a quarter of the free '
                                     'device memory on CUDA, of the available host memory on CPU)')
    read_threads: int = opt(4, 'Threads decoding store chunks')
    keep_rows: bool = opt(True, 'keep the decoded training rows in memory (device memory on CUDA, host RAM on CPU) '
                                'when they fit keep_memory: epochs after the first then skip the store')
    keep_memory: float = opt(0.0, 'GiB the kept rows may take (0 = auto: half of the free device memory on CUDA, '
                                  'of the available host memory on CPU)')
    checkpoint_every: int = opt(500, 'Write a checkpoint every N steps')
    log_every: int = opt(25, 'Log metrics every N steps')
    seed: int = opt(0, 'Random seed (cls+K patch choice, loader order, initialisation)')
    device: str = opt("auto", 'auto | cpu | cuda | cuda:N')
    precision: str = opt("auto", 'auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16')
    decode: str = opt("auto", 'auto (TopK family: dense GEMM on CUDA under bf16 autocast, sparse gather '
                               'otherwise: the faster of the two there) | sparse | dense')
    resume: bool = opt(False, 'Continue from the checkpoint in --out exactly')
    overwrite: bool = opt(False, 'Replace an existing store/run of different settings')

    def validate(self) -> None:
        _check_choice("decay", self.decay, ("cosine", "linear", "none"))
        _check_choice("l0_penalty", self.l0_penalty, ("l0", "tanh"))
        _check_choice("precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("decode", self.decode, ("auto", "sparse", "dense"))
        token_type(self.tokens)
        for key in ("steps", "batch_size", "lr", "expansion", "checkpoint_every", "log_every", "read_threads"):
            _check_positive(key, getattr(self, key))
        for key in ("warmup_steps", "weight_decay", "grad_clip", "aux_k", "aux_coef", "l0_coef", "n_features"):
            _check_positive(key, getattr(self, key), allow_zero=True)
        for key in ("shuffle_chunks", "shuffle_memory", "keep_memory"):
            _check_positive(key, getattr(self, key), allow_zero=True)
        if self.lr > MAX_LR:
            raise ConfigError(f"lr: {self.lr:g} is far beyond any learning rate AdamW trains a CLT with (at most "
                              f"{MAX_LR:g}; the default is 2e-4)")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout: must be in [0, 1), got {self.holdout}")
        # CLTSpec validates the sparsifier, k and the JumpReLU settings (the store's shape comes at fit time).
        self.spec(1, 1, n_features=self.n_features or max(self.k, 0) + 1)
        if self.resume and self.overwrite:
            raise ConfigError("resume/overwrite: choose one")

    def features(self, d_model: int) -> int:
        return self.n_features or self.expansion * d_model

    def spec(self, n_layers: int, d_model: int, n_features: int = 0) -> CLTSpec:
        """The CLT these settings train on a store of this shape (raises ConfigError if they do not fit it)."""
        return CLTSpec(n_layers=n_layers, d_model=d_model, n_features=n_features or self.features(d_model),
                       sparsifier=self.sparsifier, k=self.k, dec_bias=self.dec_bias,
                       jumprelu_threshold=self.jumprelu_threshold, jumprelu_bandwidth=self.jumprelu_bandwidth)


@dataclass(frozen=True)
class AnalyzeConfig:
    """`clt-pipe analyze`: fidelity, attribution, zero-shot substitution, ablations, retrieval, report."""

    store: str = opt(f"{DEFAULT_STORE_ROOT}/default.zarr", 'Store: local path or fsspec URL')
    clt: str = opt("runs/clt", 'Directory of a fitted CLT (clt-pipe fit --out)')
    out: str = opt("runs/report", 'Output directory')
    data_root: str = opt("", "the store's images, for the parts that re-run the ViT on them: closedloop and "
                             "ablation (required), graphs (default: the store's recorded data_root)")
    split: str = opt("", "split for closed-loop images; default: the store's split")
    only: list[str] = opt(lambda: list(ANALYZE_PARTS), 'Parts to run, comma-separated: ' + ', '.join(ANALYZE_PARTS),
                          factory=True)
    template_set: str = opt("single", 'Zero-shot template set stored in the store (single | ensemble)')
    windows: list[str] = opt(lambda: ["0-11", "3-11", "7-11", "10-11"],
                             'Substitution windows FIRST-LAST (inclusive layer indices; '
                             'clipped or rescaled for shallower models)', factory=True)
    window_tokens: list[str] = opt(lambda: ["cls", "all"],
                                   'Token types substituted in closed-loop windows (cls | patches | all)', factory=True)
    sources_before_window: bool = opt(True,
                                      "True: substituted layers get the CLT's full reconstruction (sources 0..j, "
                                      "earlier layers encoded from their live inputs) | "
                                      "False: only sources inside the window write")
    ablation_rank: str = opt("attribution",
                             "attribution (each layer's share of the summed MLP write into the final residual) | "
                             "final_layer (share of the last layer's reconstruction) | "
                             "fvu (worst reconstructed first)")
    ablation_keep: int = opt(4, 'Layers kept by the keep-top-k ablation')
    ablation_mode: str = opt("features",
                             "features: a dropped layer's CLT features write into no target (every MLP replaced) | "
                             "true: a dropped layer's MLP keeps its real output | "
                             "zero: a dropped layer's MLP outputs 0")
    ablation_protocol: str = opt("replacement",
                                 "replacement: ablations start from the CLT at every MLP | real: from the unmodified "
                                 "model, only the kept layers' MLPs replaced (the paper's table; modes features, zero)")
    mean_images: int = opt(2048, "images of the CLT's training store whose per-position MLP-output means give "
                                 "mean-ablation and the mean-predictor baseline (0 = all)")
    retrieval_queries: int = opt(6, 'Query images for the retrieval grids')
    retrieval_eval_queries: int = opt(2500, 'Query images for the retrieval label agreement (0 = every image; '
                                            '2,500 bound its s.e. by .01)')
    retrieval_k: int = opt(5, 'Neighbours shown per query and layer')
    max_images: int = opt(0, 'cap on images for closed-loop parts (0 = all in the store)')
    max_tokens: int = opt(0, 'cap on rows streamed for fidelity (0 = all)')
    batch_size: int = opt(64, 'Images (harvest/analyze) or token rows (fit) per batch')
    device: str = opt("auto", 'auto | cpu | cuda | cuda:N')
    read_threads: int = opt(4, 'Threads decoding store chunks')
    atlas_features: list[str] = opt(list, 'atlas: features always shown, LAYER:FEATURE comma-separated '
                                          '(e.g. 3:17,5:2)', factory=True)
    atlas_top_per_layer: int = opt(8, 'atlas: features shown per layer, ranked by mean activation over all tokens')
    atlas_top_images: int = opt(8, 'atlas: top images (by max activation over tokens) kept per feature')
    graph_images: list[str] = opt(list, "graphs: images whose attribution graphs are built, comma-separated store "
                                        "indices or class names (a class: its first evaluated image; a name wins "
                                        "over an index, image:N and class:NAME say which); default: graph_count "
                                        "classes spread over the class list", factory=True)
    graph_count: int = opt(3, 'graphs: images chosen when graph_images is empty')
    graph_batch_size: int = opt(256, 'graphs: target nodes per batched backward pass '
                                     '(memory: B x (L+2) x positions x d floats)')

    def validate(self) -> None:
        _check_features("atlas_features", self.atlas_features)
        _check_positive("graph_count", self.graph_count)
        _check_positive("graph_batch_size", self.graph_batch_size)
        _check_positive("atlas_top_images", self.atlas_top_images)
        _check_positive("atlas_top_per_layer", self.atlas_top_per_layer, allow_zero=True)
        for part in self.only:
            _check_choice("only", part, ANALYZE_PARTS)
        if not self.only:
            raise ConfigError("only: select at least one part")
        for w in self.windows:
            if not re.match(r"^\d+-\d+$", w):
                raise ConfigError(f"windows: {w!r} is not FIRST-LAST (e.g. 3-11)")
            a, b = (int(x) for x in w.split("-"))
            if a > b:
                raise ConfigError(f"windows: {w!r} starts after it ends")
        for t in self.window_tokens:
            token_type(t, "window_tokens")
        if not self.window_tokens:
            raise ConfigError("window_tokens: empty token selection")
        _check_choice("ablation_rank", self.ablation_rank, ABLATION_RANKS)
        _check_choice("ablation_mode", self.ablation_mode, ABLATION_MODES)
        _check_choice("ablation_protocol", self.ablation_protocol, ABLATION_PROTOCOLS)
        if self.ablation_protocol == "real" and self.ablation_mode == "true":
            raise ConfigError("ablation_mode: true has nothing to drop with ablation_protocol real (the real MLP is "
                              "already there): use features or zero")
        for key in ("batch_size", "retrieval_k", "read_threads"):
            _check_positive(key, getattr(self, key))
        for key in ("ablation_keep", "retrieval_queries", "retrieval_eval_queries", "max_images", "max_tokens",
                    "mean_images"):
            _check_positive(key, getattr(self, key), allow_zero=True)


def _check_features(key: str, features: list[str]) -> None:
    for f in features:
        if not FEATURE_RE.match(f):
            raise ConfigError(f"{key}: {f!r} is not LAYER:FEATURE (e.g. 3:17)")


@dataclass
class AtlasConfig:
    """`clt-pipe atlas`: a static HTML feature atlas (top images with patch heatmaps, decoder footprints,
    logit effects) of a fitted CLT over a store."""

    store: str = opt(f"{DEFAULT_STORE_ROOT}/default.zarr", 'Store: local path or fsspec URL')
    clt: str = opt("runs/clt", 'Directory of a fitted CLT (clt-pipe fit --out)')
    out: str = opt("runs/report", 'Output directory; the atlas goes to OUT/atlas/')
    data_root: str = opt("", "Dataset root for thumbnails; default: the store's recorded data_root")
    features: list[str] = opt(list, 'Features always shown, LAYER:FEATURE comma-separated (e.g. 3:17,5:2)',
                              factory=True)
    top_per_layer: int = opt(8, 'Features shown per layer, ranked by mean activation over all tokens')
    top_images: int = opt(8, 'Top images (by max activation over tokens) kept per feature')
    thumb_px: int = opt(96, 'Thumbnail size in pixels')
    template_set: str = opt("single", 'Zero-shot template set whose text classifier scores the logit effects')
    max_tokens: int = opt(0, 'cap on rows streamed (0 = all)')
    device: str = opt("auto", 'auto | cpu | cuda | cuda:N')
    read_threads: int = opt(4, 'Threads decoding store chunks')

    def validate(self) -> None:
        _check_features("features", self.features)
        _check_positive("top_images", self.top_images)
        _check_positive("thumb_px", self.thumb_px)
        for key in ("top_per_layer", "max_tokens"):
            _check_positive(key, getattr(self, key), allow_zero=True)
        _check_positive("read_threads", self.read_threads)
        if self.top_per_layer == 0 and not self.features:
            raise ConfigError("atlas: top_per_layer is 0 and no --features given: nothing to show")


@dataclass(frozen=True)
class GraphConfig:
    """`clt-pipe graph`: the attribution graph of one image through the CLT's replacement model."""

    store: str = opt(f"{DEFAULT_STORE_ROOT}/default.zarr", 'Store: local path or fsspec URL')
    clt: str = opt("runs/clt", 'Directory of a fitted CLT (clt-pipe fit --out)')
    out: str = opt("runs/graph", 'Output directory (graph page, circuit-tracer files, atlas of its features)')
    image: str = opt("0", 'The image: a store image index, or an image file')
    target: str = opt("", 'Target class (name or index); default: the predicted class')
    versus: str = opt("", 'Second class: the target becomes logit(target) - logit(versus)')
    template_set: str = opt("single", 'Zero-shot template set whose text classifier is the head')
    node_threshold: float = opt(0.8, 'Pruning: keep the nodes holding this share of the influence (circuit-tracer)')
    edge_threshold: float = opt(0.98, 'Pruning: keep the edges holding this share of the influence (circuit-tracer)')
    max_n_logits: int = opt(10, 'Logit nodes: at most this many top classes (circuit-tracer)')
    desired_logit_prob: float = opt(0.95, 'Logit nodes: top classes until their probabilities sum to this')
    batch_size: int = opt(256, 'Target nodes per batched backward pass (memory: B x (L+2) x positions x d floats)')
    paths: int = opt(10, 'Strongest paths to the target listed on the page')
    atlas: bool = opt(True, 'Write atlas pages of the kept features under OUT/atlas (one pass over the store)')
    atlas_max_tokens: int = opt(0, 'atlas: cap on store rows scanned (0 = all)')
    top_images: int = opt(8, 'atlas: top images kept per feature')
    thumb_px: int = opt(192, 'Pixel size of the image heatmaps')
    data_root: str = opt("", "Dataset root for the image; default: the store's recorded data_root")
    device: str = opt("auto", 'auto | cpu | cuda | cuda:N')
    read_threads: int = opt(4, 'Threads decoding store chunks')

    def validate(self) -> None:
        for key in ("node_threshold", "edge_threshold", "desired_logit_prob"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{key}: must be between 0 and 1, got {v}")
        for key in ("max_n_logits", "batch_size", "top_images", "thumb_px", "read_threads"):
            _check_positive(key, getattr(self, key))
        for key in ("paths", "atlas_max_tokens"):
            _check_positive(key, getattr(self, key), allow_zero=True)
        if not self.image:
            raise ConfigError("image: give a store image index or an image file")


STAGES: dict[str, type] = {"harvest": HarvestConfig, "fit": FitConfig, "analyze": AnalyzeConfig}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # CLI form: "a,b,c"
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan passes every range check (all its comparisons are false)
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, *layers: Mapping[str, Any] | None, section: str = "") -> Any:
    """Build and validate ``cls`` from mappings applied in order (later wins); ``None`` values are skipped."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    prefix = f"{section}." if section else ""
    for layer in layers:
        for key, value in (layer or {}).items():
            norm = key.replace("-", "_")
            if norm not in names:
                raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
            if value is None:
                continue
            values[norm] = _coerce(prefix + norm, value, hints[norm])
    obj = cls(**values)
    try:
        obj.validate()
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
