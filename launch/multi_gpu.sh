#!/usr/bin/env bash
# One host, all its GPUs: the client axis of each round is sharded over every visible device.
#   bash launch/multi_gpu.sh configs/cifar10_lt.py:if=100 [--workdir=...] [--config.x=...]
set -euo pipefail
config=${1:?usage: launch/multi_gpu.sh CONFIG [flags...]}; shift
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m fedllava.main --config="$config" "$@"
