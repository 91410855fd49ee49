#!/usr/bin/env bash
# The stage-1 GPU measurement (device time is minutes): the LLaVA-1.5-7B-shaped teacher, the DWP
# gradient to the visual features, remat on/off. Results land in $OUT (or benchmarks/results).
# Wheels the offline GPU machine lacks: bash ../shared/tools/device-wheels.sh. The round (stage 2)
# contenders are in benchmarks/gpu_suite_fl.sh.
set -uo pipefail
out=${OUT:-benchmarks/results}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 190 python3 benchmarks/teacher_step.py --size=7b --batch=8 --skip_clip --skip_forward \
  --remat=on,off --iters=3 --out="$out/teacher_step_gpu_dwp.json" 2>&1 | tee "$out/teacher_dwp.log"
