#!/usr/bin/env bash
# Every ratio benchmark, appending its lines to benchmarks/BENCHMARKS.md. Run on an otherwise idle machine:
# the ratios are side by side within one run, but a busy machine makes both sides noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/bench_harvest.py --model clt_pipe/demo/assets/tiny-clip.json --images 2048 --batch 64 --repeats 5 --write
python benchmarks/bench_harvest.py --model ViT-B-32 --images 96 --batch 32 --repeats 5 --write
python benchmarks/bench_harvest.py --model ViT-B-32 --images 96 --batch 32 --repeats 5 --tokens cls --write
python benchmarks/bench_loader.py --write
python benchmarks/bench_decode.py --batch 128 --repeats 3 --write
python benchmarks/bench_substitution.py --write
python benchmarks/bench_sweep.py --repeats 5 --write
