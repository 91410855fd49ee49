#!/usr/bin/env bash
# Every GPU measurement of fl_round.py, fl_clients.py and fl_runs.py in one run: the timeouts
# add up to 590 s (< 10 minutes of device time).
# The paper's CIFAR-10-LT IF=100 round (ResNet-8 width 64, 8 of 20 clients, 10 local epochs,
# batch 32): fedllava's strategies x conv lowering x {fp32, bf16}, CReFF's PyTorch loop, the
# best honest PyTorch (data on device, channels_last, bf16 autocast, fused SGD, torch.compile +
# CUDA graphs) and pfl-research, timed interleaved in one process per group; JSON + PNG under
# $OUT (or benchmarks/results). Device set-up mirrors benchmarks/gpu_suite_teacher.sh: the wheels the
# offline GPU machine lacks come from `bash ../shared/tools/device-wheels.sh` (./.whl); pfl and
# its pure-Python deps, if wanted, from `pip download --no-deps -d .whl pfl dp-accounting
# prv-accountant multiprocess dill` beforehand (skipped with a reason in the JSON otherwise).
# Check it on CPU first:  OUT=/tmp/fl PRESET=ci bash benchmarks/gpu_suite_fl.sh
set -uo pipefail
out=${OUT:-benchmarks/results}
preset=${PRESET:-paper}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site PFL_SITE=/tmp/site
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # jax and torch share the GPU
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv | tee "$out/gpu_fl.txt"
run() {  # run SECONDS NAME ARGS...: one fl_round.py process, its own JSON and log
  local t=$1 name=$2; shift 2
  timeout "$t" python3 benchmarks/fl_round.py --preset="$preset" --repeats=3 \
    --out="$out/fl_round_${preset}_gpu_$name.json" "$@" 2>&1 | tee "$out/fl_round_${preset}_$name.log"
}
# 1. fp32 oracle path (TF32 off) and bf16 mixed precision, vmap / map / group:4, both lowerings,
#    next to the PyTorch contenders, all interleaved (~5.5 min: 15 compiles + 4 x 19 rounds;
#    map@eigen: XLA convolutions with forward-form gradients, the CPU's `auto` lowering without oneDNN).
run 330 main --precision=highest --contenders=jax:vmap@xla:fp32,jax:map@xla:fp32,jax:map@eigen:fp32,jax:group:4@xla:fp32,jax:vmap@im2col:fp32,jax:map@im2col:fp32,jax:vmap@xla:bf16,jax:map@xla:bf16,jax:group:4@xla:bf16,jax:map@im2col:bf16,torch:creff,torch:fast:fp32,torch:fast:bf16,torch:compile:bf16
# 2. TF32 allowed (jax "default" precision) for the fp32 strategies, torch.compile fp32, pfl.
run 110 tf32 --precision=default --contenders=jax:vmap@xla:fp32,jax:map@xla:fp32,torch:compile:fp32,pfl:fp32
# 3. Clients per round 8, 64, 256, 1000 on one device (benchmarks/fl_clients.py): CIFAR-sized
#    Dirichlet split over 1000 clients, ResNet-8 width 64, chunked strategy with the auto chunk
#    size (~4 compiles + 8 rounds; digits and the vmap comparison are left out for time).
clients_preset=gpu; [ "$preset" = ci ] && clients_preset=ci
timeout 80 python3 benchmarks/fl_clients.py --preset="$clients_preset" --datasets=cifar \
  --strategies=chunked --repeats=2 --out="$out/fl_clients_${clients_preset}_gpu.json" 2>&1 \
  | tee "$out/fl_clients_${clients_preset}.log"
# 4. Several runs (seeds) as one program: s/round and s/run/round for R = 1, 3, 8 (~1 min).
timeout 70 python3 benchmarks/fl_runs.py --preset="$preset" --runs=1,3,8 --repeats=3 --single \
  --out="$out/fl_runs_${preset}_gpu.json" 2>&1 | tee "$out/fl_runs_${preset}.log"
ls -l "$out"/fl_round_"${preset}"_gpu_*.json "$out"/fl_clients_*.json "$out"/fl_runs_"${preset}"_gpu.json
