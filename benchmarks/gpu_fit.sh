#!/usr/bin/env bash
# GPU figures of issue #10 in one run (~8 min on an H200): the shipped fit (AuxK on, default loader and
# shuffle, the device data path) vs the same step on rows already in GPU memory, at ViT-B/32 sizes
# (L 12, d 768, x8, k 32, B 4096), the AuxK cost, the mixing, and the start-up of the real command.
# Every step has its own timeout, so one hang cannot eat the session's device time.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DIR=${DIR:-/tmp/bench-fit-vitb}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
# 1. product vs preloaded, AuxK on/off, distinct images, start-up of run_fit (writes the 1.9 GB store once)
timeout 420 python benchmarks/bench_fit.py --device cuda --dir "$DIR" --images 1024 --tokens 50 --layers 12 \
  --d-model 768 --batch 4096 --steps 20 --repeats 3 --warmup 8 || echo "bench_fit: exit $?"
# 2. the command itself: wall time from the shell to the end, and its own start-up figures in the summary
t0=$(date +%s%N)
timeout 180 python -m clt_pipe fit --store "$DIR/store.zarr" --out /tmp/bench-fit-cli --overwrite --device cuda \
  --batch-size 4096 --steps 60 --dead-tokens 8192 --log-every 20 || echo "clt-pipe fit: exit $?"
echo "clt-pipe fit wall: $(( ($(date +%s%N) - t0) / 1000000 )) ms (the summary above holds startup_s, steps_per_s)"
