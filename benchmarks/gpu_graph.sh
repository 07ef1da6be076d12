#!/usr/bin/env bash
# Issue 23: the attribution graph of one image at ViT-B/32 sizes on the GPU (~2 min on an H200): 12 layers,
# width 768, 50 positions, random weights; a random CLT x8, k 32 (19,200 feature nodes). Prints the attribution
# time per backward batch size side by side, peak GPU memory, pruning time and the completeness error (≤ 1e-4).
# Every step has its own timeout, so one hang cannot eat the session's device time.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
timeout 300 python benchmarks/bench_graph.py --device cuda --layers 12 --expansion 8 --k 32 \
  --batch-sizes 256,1024 --repeats 3 --write || echo "bench_graph: exit $?"
