"""A real, tiny open_clip CLIP trained by the project itself on scikit-learn's handwritten digits.

The demo needs a CLIP whose vision tower has actually learned something (so that harvested activations,
fitted transcoders and the zero-shot probe mean something) without downloading weights. We train the
``tiny-clip`` config (``assets/tiny-clip.json``: ViT 6 layers x width 64 on 32 px images with 8 px patches,
a 2-layer text tower, 64-d joint space) contrastively on ``DigitsDataset("train")`` with captions drawn from
the dataset's digit templates ("a photo of the number seven.", "a handwritten seven.", ...).

Objective. There are only 10 classes, so a batch holds many images with the *same* caption. Plain CLIP
InfoNCE would treat those as negatives of one another. Instead, every step encodes one caption per class
(a template drawn at random per class, for caption variety) and uses the multi-positive (supervised)
contrastive form of the symmetric CLIP loss, which is exactly CLIP's loss once identical captions in a
batch are merged: image -> text is cross-entropy over the 10 captions; text -> image spreads the target
uniformly over the batch images of that caption's class. Images get small random integer shifts
(up to ``MAX_SHIFT`` px, i.e. one original 8x8 pixel) as augmentation.

Determinism. ``torch.manual_seed(seed)`` before building the model, a private ``torch.Generator`` seeded
from ``seed`` for shuffling / templates / shifts, ``torch.use_deterministic_algorithms(True)`` and a fixed
thread count (``TRAIN_THREADS``) while training: the same seed on the same machine and torch build gives a
byte-identical checkpoint.

Cache. ``ensure_tiny_clip`` keeps ``tiny-clip.json`` + ``tiny-clip.pt`` + ``tiny-clip.meta.json`` in one
directory, built in a temporary sibling directory and renamed into place only when complete; the meta file
(written last) records the checkpoint's sha256, so a partial or tampered cache never reads as valid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clt_pipe.atomic import write_json_atomic
from clt_pipe.checksums import file_sha256
from clt_pipe.datasets.digits import (
    CLASS_NAMES,
    ENSEMBLE_TEMPLATES,
    SINGLE_TEMPLATE,
    DigitsDataset,
    digit_to_pil,
    load_digits_arrays,
)

log = logging.getLogger(__name__)

MODEL_NAME = "tiny-clip"
CONFIG_FILE = f"{MODEL_NAME}.json"
CHECKPOINT_FILE = f"{MODEL_NAME}.pt"
META_FILE = f"{MODEL_NAME}.meta.json"
# Bump whenever the training recipe changes so stale caches are retrained.
RECIPE_VERSION = 1
DEFAULT_EPOCHS = 20
BATCH_SIZE = 64
LR = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_FRAC = 0.05
MAX_SHIFT = 4
AUX_WEIGHT = 0.5
TRAIN_THREADS = 2
TEST_FRACTION = 0.2

# progress(epoch_done, epochs, mean_loss_of_that_epoch)
ProgressFn = Callable[[int, int, float], None]


@dataclass
class TinyClipArtifacts:
    config_path: Path
    checkpoint_path: Path
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers
def asset_config_path() -> Path:
    """The shipped ``tiny-clip.json`` (an open_clip model config)."""
    return Path(str(resources.files("clt_pipe.demo").joinpath(f"assets/{CONFIG_FILE}")))


def default_cache_dir(seed: int = 0) -> Path:
    """``$CLT_PIPE_CACHE/tiny-clip-seed{seed}`` if the variable is set,
    else ``~/.cache/clt-pipe/tiny-clip-seed{seed}``."""
    root = os.environ.get("CLT_PIPE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "clt-pipe"
    return base / f"tiny-clip-seed{seed}"


def _import_open_clip():
    import open_clip  # heavy import, deferred

    return open_clip


def load_tiny_clip(artifacts: TinyClipArtifacts | None = None, config_path: Path | None = None,
                   checkpoint_path: Path | None = None):
    """``(model, preprocess, tokenizer)`` for the trained tiny CLIP (eval mode, CPU), via open_clip itself."""
    open_clip = _import_open_clip()
    if artifacts is not None:
        config_path, checkpoint_path = artifacts.config_path, artifacts.checkpoint_path
    if config_path is None:
        config_path = asset_config_path()
    open_clip.add_model_config(Path(config_path))
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(checkpoint_path) if checkpoint_path is not None else None
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)


@contextlib.contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def _image_tensor(images: np.ndarray) -> torch.Tensor:
    """Digits (uint8 [N, 8, 8], 0..16) -> float [N, 3, 32, 32] in 0..1, exactly what ``load_image`` +
    open_clip's Resize/CenterCrop/ToTensor give (the images are already 32x32, so those are identities)."""
    arr = np.stack([np.asarray(digit_to_pil(im), dtype=np.uint8) for im in images])  # [N, 32, 32, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer (dy, dx) in [-max_shift, max_shift], filling with background (0)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift), value=0.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(offs)])


def _clip_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with identical captions merged: ``txt`` holds one caption per class."""
    logits = scale * img @ txt.t()  # [B, C]
    loss_i2t = F.cross_entropy(logits, labels)
    onehot = F.one_hot(labels, txt.shape[0]).t().float()  # [C, B]
    present = onehot.sum(1) > 0
    target = onehot[present] / onehot[present].sum(1, keepdim=True)
    loss_t2i = -(target * F.log_softmax(logits.t()[present], dim=1)).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def _same_caption_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Within-modality terms: images with the same caption are positives of each other (SupCon), and the
    class captions are negatives of each other. Without them both towers first collapse to a constant
    embedding (the fastest way down from random init) and take many epochs to escape."""
    n = img.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    logits = (scale * img @ img.t()).masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    logp = F.log_softmax(logits, dim=1)
    loss_ii = -((logp * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()
    loss_tt = F.cross_entropy(scale * txt @ txt.t(), torch.arange(txt.shape[0]))
    return loss_ii + loss_tt


def _param_groups(model: torch.nn.Module, weight_decay: float, exclude: Sequence[torch.Tensor] = ()) -> list[dict]:
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        # open_clip's rule: no decay on gains, biases, embeddings-as-1d, logit_scale
        (no_decay if p.ndim < 2 or "ln" in n or "bias" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, preprocess, dataset, templates: Sequence[str] | str = "single",
                       batch_size: int = 256) -> float:
    """Zero-shot top-1 of ``model`` on ``dataset``: class embeddings = the normalised mean of the normalised
    text embeddings of ``templates`` (a list of "{c}" strings, or a key of ``dataset.templates``); images
    go through ``preprocess`` (open_clip's real transform) from ``dataset.load_image``."""
    if isinstance(templates, str):
        templates = dataset.templates[templates]
    was_training = model.training
    model.eval()
    try:
        class_emb = []
        for c in dataset.class_names:
            t = model.encode_text(tokenizer([tpl.format(c=c) for tpl in templates]), normalize=True)
            class_emb.append(F.normalize(t.mean(0), dim=-1))
        W = torch.stack(class_emb)  # [C, D]
        correct, total = 0, 0
        n = len(dataset)
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            x = torch.stack([preprocess(dataset.load_image(i)) for i in idx])
            y = torch.tensor([dataset.record(i).label for i in idx])
            pred = (model.encode_image(x, normalize=True) @ W.t()).argmax(1)
            correct += int((pred == y).sum())
            total += len(y)
        return correct / max(total, 1)
    finally:
        model.train(was_training)


# -------------------------------------------------------------------------------------------- training
def train_tiny_clip(out_dir: Path, seed: int = 0, epochs: int = DEFAULT_EPOCHS,
                    progress: ProgressFn | None = None, config_path: Path | None = None) -> TinyClipArtifacts:
    """Train the tiny CLIP on ``DigitsDataset('train', seed)`` and write, into ``out_dir``,
    ``tiny-clip.json`` (config), ``tiny-clip.pt`` (plain state_dict, loadable by
    ``open_clip.create_model_and_transforms('tiny-clip', pretrained=...)``) and, last,
    ``tiny-clip.meta.json`` (seed, epochs, split sizes, zero-shot test top-1, checkpoint sha256, wall time).
    ``progress(epoch_done, epochs, mean_loss)`` is called after every epoch."""
    t_start = time.perf_counter()
    open_clip = _import_open_clip()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src_config = Path(config_path) if config_path is not None else asset_config_path()
    cfg_out = out_dir / CONFIG_FILE
    ckpt_out = out_dir / CHECKPOINT_FILE
    meta_out = out_dir / META_FILE
    meta_out.unlink(missing_ok=True)  # the meta file marks completion; never leave a stale one behind
    shutil.copyfile(src_config, cfg_out)

    train_imgs, train_labels, _ = load_digits_arrays("train", seed, TEST_FRACTION)
    x_all = _image_tensor(train_imgs)
    y_all = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    n = len(y_all)
    steps_per_epoch = math.ceil(n / BATCH_SIZE)
    total_steps = max(1, epochs * steps_per_epoch)
    warmup = max(1, int(WARMUP_FRAC * total_steps))

    with _deterministic_torch(TRAIN_THREADS):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        open_clip.add_model_config(cfg_out)
        model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
        tokenizer = open_clip.get_tokenizer(MODEL_NAME)
        # every (template, class) caption, tokenised once: [T, C, L]
        tokens = torch.stack([tokenizer([tpl.format(c=c) for c in CLASS_NAMES]) for tpl in ENSEMBLE_TEMPLATES])
        n_tpl, n_cls = tokens.shape[:2]
        # The 49,408 x 64 token table is 88% of the parameters but only ~50 rows are ever used: give it
        # sparse gradients and SparseAdam (no weight decay) so each step doesn't update 3.2M dead weights.
        model.token_embedding.sparse = True
        emb = model.token_embedding.weight
        opts = [
            torch.optim.AdamW(_param_groups(model, WEIGHT_DECAY, exclude=(emb,)), lr=LR, betas=(0.9, 0.98), eps=1e-6),
            torch.optim.SparseAdam([emb], lr=LR, betas=(0.9, 0.98), eps=1e-6),
        ]

        def lr_at(step: int) -> float:
            if step < warmup:
                return LR * (step + 1) / warmup
            return 0.5 * LR * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

        model.train()
        step = 0
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            losses = []
            for b in range(steps_per_epoch):
                idx = perm[b * BATCH_SIZE:(b + 1) * BATCH_SIZE]
                x = _normalize(_random_shift(x_all[idx], MAX_SHIFT, gen))
                y = y_all[idx]
                tpl = torch.randint(0, n_tpl, (n_cls,), generator=gen)
                caps = tokens[tpl, torch.arange(n_cls)]  # one random template per class
                for opt in opts:
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step)
                img = model.encode_image(x, normalize=True)
                txt = model.encode_text(caps, normalize=True)
                scale = model.logit_scale.exp()
                loss = _clip_loss(img, txt, y, scale) + AUX_WEIGHT * _same_caption_loss(img, txt, y, scale)
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in opts:
                    opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                losses.append(float(loss.detach()))
                step += 1
            if progress is not None:
                progress(epoch + 1, epochs, float(np.mean(losses)))

        model.token_embedding.sparse = False
        model.eval()
        torch.save(model.state_dict(), ckpt_out)
        test_ds = DigitsDataset("test", seed=seed, test_fraction=TEST_FRACTION)
        acc = zero_shot_accuracy(model, tokenizer, preprocess, test_ds, [SINGLE_TEMPLATE])
        acc_ens = zero_shot_accuracy(model, tokenizer, preprocess, test_ds, list(ENSEMBLE_TEMPLATES))

    meta = {
        "model": MODEL_NAME,
        "recipe_version": RECIPE_VERSION,
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "max_shift_px": MAX_SHIFT,
        "aux_weight": AUX_WEIGHT,
        "threads": TRAIN_THREADS,
        "dataset": "sklearn-digits",
        "test_fraction": TEST_FRACTION,
        "n_train": int(n),
        "n_test": len(test_ds),
        "zero_shot_template": SINGLE_TEMPLATE,
        "zero_shot_top1_test": acc,
        "zero_shot_top1_test_ensemble": acc_ens,
        "final_loss": float(np.mean(losses)) if epochs > 0 else None,
        "checkpoint_sha256": file_sha256(ckpt_out),
        "config_sha256": file_sha256(cfg_out),
        "torch_version": torch.__version__,
        "open_clip_version": getattr(open_clip, "__version__", "unknown"),
        "wall_time_s": round(time.perf_counter() - t_start, 3),
    }
    write_json_atomic(meta_out, meta, indent=2)
    log.info("tiny-clip trained in %.1fs: zero-shot test top-1 %.3f", meta["wall_time_s"], acc)
    return TinyClipArtifacts(config_path=cfg_out, checkpoint_path=ckpt_out, meta=meta)


# ---------------------------------------------------------------------------------------------- cache
def read_valid_cache(cache_dir: Path, seed: int = 0, config_path: Path | None = None,
                     epochs: int = DEFAULT_EPOCHS) -> TinyClipArtifacts | None:
    """The artifacts in ``cache_dir`` if they are complete and match (seed, epochs, recipe, config, sha256)."""
    cache_dir = Path(cache_dir)
    cfg, ckpt, meta_p = cache_dir / CONFIG_FILE, cache_dir / CHECKPOINT_FILE, cache_dir / META_FILE
    if not (cfg.is_file() and ckpt.is_file() and meta_p.is_file()):
        return None
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, ValueError):
        return None
    src_config = Path(config_path) if config_path is not None else asset_config_path()
    expected = {"seed": int(seed), "epochs": int(epochs), "recipe_version": RECIPE_VERSION,
                "config_sha256": file_sha256(src_config)}
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
        return None
    if file_sha256(cfg) != meta["config_sha256"] or file_sha256(ckpt) != meta.get("checkpoint_sha256"):
        return None
    return TinyClipArtifacts(config_path=cfg, checkpoint_path=ckpt, meta=meta)


def ensure_tiny_clip(cache_dir: Path | None = None, seed: int = 0, progress: ProgressFn | None = None,
                     epochs: int = DEFAULT_EPOCHS) -> TinyClipArtifacts:
    """Cached tiny CLIP for ``seed`` (see ``default_cache_dir``), training it first if the cache is
    missing or invalid. Training happens in a temporary sibling directory renamed into place when done."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(seed)
    found = read_valid_cache(cache_dir, seed, epochs=epochs)
    if found is not None:
        return found
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the renamed cache should read like any other directory
    try:
        train_tiny_clip(tmp, seed=seed, epochs=epochs, progress=progress)
        if cache_dir.exists():  # invalid leftovers (validated above); another process may have raced us
            found = read_valid_cache(cache_dir, seed, epochs=epochs)
            if found is not None:
                return found
            shutil.rmtree(cache_dir, ignore_errors=True)
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            found = read_valid_cache(cache_dir, seed, epochs=epochs)  # lost a race to a valid cache
            if found is not None:
                return found
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    found = read_valid_cache(cache_dir, seed, epochs=epochs)
    if found is None:  # pragma: no cover - would mean the freshly written cache is inconsistent
        raise RuntimeError(f"tiny-clip cache at {cache_dir} failed validation right after training")
    return found
