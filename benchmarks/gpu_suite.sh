#!/usr/bin/env bash
# Every GPU measurement in one run (device time is minutes). Results land in $OUT (or
# benchmarks/results). Wheels the offline GPU machine lacks: bash ../shared/tools/device-wheels.sh
#   1. round speed at the CIFAR-10-LT IF=100 shapes: client-parallel strategies x conv lowering,
#      fp32 ("highest", TF32 off), then the two best with TF32 allowed;
#   2. the LLaVA-1.5-7B-shaped teacher: the DWP gradient to the visual features, remat on/off.
set -uo pipefail
out=${OUT:-benchmarks/results}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 150 python3 benchmarks/round_speed.py --preset=cifar10_lt --repeats=3 \
  --strategies=vmap@im2col,group:4@im2col,sequential@im2col,vmap,sequential \
  --out="$out/round_speed_gpu_fp32.json" 2>&1 | tee "$out/round_speed_fp32.log"
timeout 60 python3 benchmarks/round_speed.py --preset=cifar10_lt --repeats=3 --precision=default \
  --strategies=vmap@im2col,sequential --out="$out/round_speed_gpu_tf32.json" 2>&1 \
  | tee "$out/round_speed_tf32.log"
timeout 190 python3 benchmarks/teacher_step.py --size=7b --batch=8 --skip_clip --skip_forward \
  --remat=on,off --iters=3 --out="$out/teacher_step_gpu_dwp.json" 2>&1 | tee "$out/teacher_dwp.log"
