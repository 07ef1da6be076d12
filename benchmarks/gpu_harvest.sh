#!/usr/bin/env bash
# Issue 11's figures on a GPU node, in one run (~6 min on an H100/H200 with 16 cores; the per-step timeouts
# are caps that sum to 12 min): harvest wall against max(bare forward, bytes / disk bandwidth measured in the same run, same file system), all tokens, ViT-B/32 and
# ViT-B/16, stored and recompute targets, the default compressor against `none`, each with its per-stage
# breakdown; CLS-only; dask --workers 2 sharing the GPU against one process. Every step has its own timeout, so
# one slow step cannot eat the others' time. STORE_DIR: where stores go (default /tmp; put it on the disk
# that real stores use).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DIR=${STORE_DIR:-/tmp}
W=${DATA_WORKERS:-12}
step() { local t=$1; shift; echo "### $*"; timeout "$t" "$@" 2>&1 | grep -v -e Warning -e warnings.warn; echo "### rc=${PIPESTATUS[0]}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc; df -h "$DIR" | tail -1
dd if=/dev/zero of="$DIR/dd.bin" bs=16M count=128 conv=fsync 2>&1 | tail -1; rm -f "$DIR/dd.bin"
B="python benchmarks/bench_harvest.py --device cuda --data-workers $W --dir $DIR --compressor blosc-lz4-bitshuffle,none"
step 150 $B --model ViT-B-32 --images 2048 --batch 256 --repeats 3 --targets stored
step 120 $B --model ViT-B-32 --images 2048 --batch 256 --repeats 3 --targets recompute
step 120 $B --model ViT-B-16 --images 512 --batch 128 --repeats 3 --targets stored
step 100 $B --model ViT-B-16 --images 512 --batch 128 --repeats 3 --targets recompute
step 60 python benchmarks/bench_harvest.py --device cuda --data-workers $W --dir "$DIR" --model ViT-B-32 --images 2048 \
  --batch 256 --repeats 3 --tokens cls
step 150 python benchmarks/bench_harvest_workers.py --device cuda --data-workers $W --dir "$DIR" --model ViT-B-32 \
  --images 2048 --batch 256 --workers 2 --repeats 2
# Issue 24: forward batches of --batch-size across shards (what ships) against cut at shard boundaries (~72 ViT-B/32
# images at all tokens, as before), side by side; then SIGTERM -> exit of a harvest on the GPU at batch 256.
step 200 python benchmarks/bench_harvest.py --device cuda --data-workers $W --dir "$DIR" --model ViT-B-32 --images 2048 \
  --batch 256 --repeats 3 --forwards grid,shard
step 240 python benchmarks/bench_stop.py --part harvest --device cuda --dir "$DIR" --model ViT-B-32 --images 4096 \
  --batch 256 --trials 2
