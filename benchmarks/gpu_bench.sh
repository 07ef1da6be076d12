#!/usr/bin/env bash
# Part 2 of the GPU figures: decode under the trainer's bf16 autocast, harvest overhead at ViT-B sizes, and the
# store loader feeding a ViT-B-sized CLT fit on the GPU. Run on an otherwise idle GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp | tail -1; dd if=/dev/zero of=/tmp/dd.bin bs=16M count=128 conv=fsync 2>&1 | tail -1; rm -f /tmp/dd.bin
[ "${SKIP_DECODE:-0}" = 1 ] || for b in 1024 4096; do python benchmarks/bench_decode.py --device cuda --batch $b --repeats 10 --skip-old; done
[ "${SKIP_HARVEST:-0}" = 1 ] || benchmarks/gpu_harvest.sh  # issue 11: ratios to max(bare, disk), stage breakdown
python benchmarks/bench_loader.py --device cuda --dir /tmp/bench-loader-vitb --images 1200 --tokens 50 --layers 12 \
  --d-model 768 --batch 4096 --threads 16 --read-threads 12 --fit-steps 20 --repeats 3
