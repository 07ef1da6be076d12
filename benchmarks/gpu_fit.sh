#!/usr/bin/env bash
# GPU figures of issues #10 and #22 in one run (~9 min on an H200, plus steps 4 and 5): the shipped fit (AuxK on, default loader
# and shuffle, the device data path, rows kept in GPU memory after the first epoch) and the same fit decoding
# the store every epoch, vs the same step on rows already in GPU memory, at ViT-B/32 sizes (L 12, d 768, x8,
# k 32, B 4096); the data path's own rows/s (store cold/cached, kept rows), the AuxK cost, the mixing, and the
# start-up of the real command. Step 4 (issue 23, ~2 min more): the attribution graph of one ViT-B/32 image.
# Step 5 (issue 22, ~6 min more): a sweep of the three sparsifiers.
# Every step has its own timeout, so one hang cannot eat the session's device time.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DIR=${DIR:-/tmp/bench-fit-vitb}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
# 1. product (kept rows) / store (--no-keep-rows) vs preloaded, data path alone, AuxK on/off, distinct images,
#    start-up of run_fit (writes the 1.9 GB store once)
timeout 420 python benchmarks/bench_fit.py --device cuda --dir "$DIR" --images 1024 --tokens 50 --layers 12 \
  --d-model 768 --batch 4096 --steps 20 --repeats 3 --warmup 8 || echo "bench_fit: exit $?"
# 2. the command itself: wall time from the shell to the end, and its own start-up figures in the summary
t0=$(date +%s%N)
timeout 180 python -m clt_pipe fit --store "$DIR/store.zarr" --out /tmp/bench-fit-cli --overwrite --device cuda \
  --batch-size 4096 --steps 60 --dead-tokens 8192 --log-every 20 || echo "clt-pipe fit: exit $?"
echo "clt-pipe fit wall: $(( ($(date +%s%N) - t0) / 1000000 )) ms (the summary above holds startup_s, steps_per_s)"
# 3. rows kept across epochs (issue 22): 60 steps over the 51,200-row store are 5 epochs. Step 2 ran the default
#    (kept rows: epochs >= 2 from GPU memory, no H2D copy); this is the same command decoding every epoch again.
#    Compare the two summaries' kept_rows, data_tiers and steps_per_s.
timeout 180 python -m clt_pipe fit --store "$DIR/store.zarr" --out /tmp/bench-fit-cli --overwrite --device cuda \
  --batch-size 4096 --steps 60 --dead-tokens 8192 --log-every 20 --no-keep-rows || echo "fit --no-keep-rows: exit $?"
# 4. issue 23: the attribution graph of one ViT-B/32-sized image
benchmarks/gpu_graph.sh
# 5. a sweep of the three sparsifiers (issue 22): the sweep loop on the shipped loader vs the sum of the members'
#    steps on preloaded rows (goal <= 1.05), at the same ViT-B/32 sizes and the pipelines' B 4096, then the real
#    command (its first line says what the sweep needs in memory)
timeout 420 python benchmarks/bench_sweep.py --device cuda --dir "$DIR" --images 1024 --tokens 50 --layers 12 \
  --d-model 768 --batch 4096 --steps 10 --repeats 3 --warmup 3 || echo "bench_sweep: exit $?"
t0=$(date +%s%N)
timeout 240 python -m clt_pipe fit --store "$DIR/store.zarr" --out /tmp/bench-sweep-cli --overwrite --device cuda \
  --batch-size 4096 --steps 60 --dead-tokens 8192 --log-every 20 --sweep sparsifier=jumprelu,relu_topk,abs_topk \
  || echo "clt-pipe fit --sweep: exit $?"
echo "clt-pipe fit --sweep wall: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
