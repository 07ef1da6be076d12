"""Open-loop (cache-only) vs closed-loop (ViT re-run) CLT substitution over the same images, side by side.

    python benchmarks/bench_substitution.py [--images 96] [--model PATH.json|ViT-B-32] [--device cpu|cuda]
                                            [--window 0-11] [--tokens cls] [--repeats 3] [--write]

Builds a throw-away store (random-init model saved to a checkpoint so it can be reloaded, noise images in an
image folder, all tokens), a random ReLU-TopK CLT, then times, interleaved, with medians:

* open-loop: stream the store, encode every CLS row, edit resid_final for the window, ln_post, proj, classify
  (``zeroshot.openloop_substitution``);
* closed-loop: decode + preprocess the images, re-run the ViT once unmodified (baseline) and once with the CLT
  substituting the window for the chosen tokens (``substitution.closed_loop``), classify.

Default: the tiny 6-layer CLIP of the demo (32 px), where the windows are rescaled to 6 layers. ``--write``
appends a line to benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import append_result, machine  # noqa: E402
from clt_pipe.analyze import substitution as SU  # noqa: E402
from clt_pipe.analyze import zeroshot as ZS  # noqa: E402
from clt_pipe.backbone.loading import load_backbone  # noqa: E402
from clt_pipe.device import resolve_device  # noqa: E402
from clt_pipe.clt.model import CrossLayerTranscoder  # noqa: E402
from clt_pipe.clt.spec import CLTSpec  # noqa: E402
from clt_pipe.config import AnalyzeConfig, HarvestConfig, build  # noqa: E402
from clt_pipe.datasets.registry import open_dataset  # noqa: E402
from clt_pipe.harvest.run import run_harvest  # noqa: E402
from clt_pipe.store.reader import ActivationStore  # noqa: E402
from clt_pipe.testing.fakedata import make_fake_imagefolder  # noqa: E402

TINY = ROOT / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--model", default=str(TINY))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--window", default="0-11")
    ap.add_argument("--tokens", default="cls", choices=("cls", "patches", "all"))
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    dev = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        bb = load_backbone(args.model, "none", dev)
        size = bb.identity.image_hw[0]
        n_cls = 4
        make_fake_imagefolder(tmp / "data", classes=tuple(f"c{i}" for i in range(n_cls)),
                              per_class=-(-args.images // n_cls), size=size)
        ckpt = tmp / "model.pt"
        torch.save(bb.model.state_dict(), ckpt)
        store_url = str(tmp / "store.zarr")
        run_harvest(build(HarvestConfig, {"model": args.model, "pretrained": str(ckpt), "dataset": "imagefolder",
                                          "data_root": str(tmp / "data"), "split": "train", "store": store_url,
                                          "tokens": "all", "limit": args.images, "template_sets": ["single"],
                                          "device": str(dev), "batch_size": args.batch, "chunk_mb": 4.0}),
                    log=lambda *a: None)
        store = ActivationStore(store_url)
        bb = load_backbone(args.model, str(ckpt), dev)
        L, d = store.n_layers, store.d_model
        torch.manual_seed(1)
        clt = CrossLayerTranscoder(CLTSpec(L, d, args.expansion * d, "relu_topk", args.k)).to(dev).eval()
        window = ZS.parse_windows([args.window], L)[0]
        dataset = open_dataset("imagefolder", tmp / "data", "train")
        idx = ZS.eval_images(store)
        clf = store.text_classifier("single")
        scale = ZS.logit_scale(store)
        plan = SU.window_plan(args.tokens, window["first"], window["last"], AnalyzeConfig().sources_before_window)

        def run_open():
            with torch.inference_mode():
                return ZS.openloop_substitution(store, clt, [window["name"]], "single", device=dev, read_threads=2)

        def run_closed():
            return SU.closed_loop(bb, clt, [plan], dataset, idx, store.labels[idx], clf, scale, args.batch)

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        run_open(), run_closed()  # warm-up
        t_open, t_closed = [], []
        for _ in range(args.repeats):
            for fn, acc in ((run_open, t_open), (run_closed, t_closed)):
                sync()
                t0 = time.perf_counter()
                res = fn()
                sync()
                acc.append(time.perf_counter() - t0)
        o, c = statistics.median(t_open), statistics.median(t_closed)
        ro, rc = run_open()["rows"][0], run_closed()
        print(f"model {bb.name} ({L} layers × {d}, {bb.identity.n_positions} tokens), {len(idx)} images, "
              f"CLT {args.expansion}×{d} features k={args.k}, window {args.window}→{window['name']}, "
              f"closed-loop tokens={args.tokens}, device {dev} ({machine()})")
        print(f"open-loop   (cache, CLS):            {o:8.3f} s  ({len(idx) / o:10.1f} images/s)  "
              f"top1 {ro['top1']:.2f}")
        print(f"closed-loop (ViT re-run + baseline): {c:8.3f} s  ({len(idx) / c:10.1f} images/s)  "
              f"top1 {rc['plans'][plan.name]['top1']:.2f}")
        print(f"ratio closed/open: {c / o:.1f}x")
        if args.write:
            append_result(f"| substitution open vs closed loop | {bb.name} {L}×{d}, {len(idx)} images, window "
                          f"{window['name']}, closed tokens={args.tokens}, {dev} | open {o:.3f} s, closed "
                          f"{c:.3f} s | closed/open {c / o:.1f}x |")
        del res


if __name__ == "__main__":
    main()
