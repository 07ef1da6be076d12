#!/usr/bin/env bash
# The CUDA paths end to end plus the decode benchmark, on a GPU machine. Part 1 of the GPU figures
# (benchmarks/gpu_bench.sh is part 2). Prints everything; copies the demo report to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, zarr, open_clip; print('torch', torch.__version__, 'zarr', zarr.__version__, 'open_clip', open_clip.__version__, torch.cuda.get_device_name())"
nproc
echo "== demo on cuda"
/usr/bin/time -v python -m clt_pipe demo --device cuda --workdir /tmp/demo-gpu 2>&1 | grep -v "^\s*\(Average\|Major\|Minor\|Volun\|Invol\|Swaps\|File sys\|Socket\|Signals\|Page size\|Exit\|Percent\|System time\|User time\)"
if [ -n "${OUT:-}" ]; then cp /tmp/demo-gpu/report/report.json "$OUT/demo-gpu-report.json" 2>/dev/null; fi
echo "== decode"
for b in 1024 4096; do python benchmarks/bench_decode.py --device cuda --batch $b --repeats 10; done
