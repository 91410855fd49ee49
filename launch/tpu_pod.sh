#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker; jax.distributed.initialize()
# auto-detects the pod. Needs `pip install -r requirements.txt "jax[tpu]"` on each worker.
#   bash launch/tpu_pod.sh my-tpu us-central2-b configs/cifar10_lt.py --workdir=gs://bucket/run1
set -euo pipefail
tpu=${1:?tpu name}; zone=${2:?zone}; config=${3:?config}; shift 3
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ~/fedllava && FEDLLAVA_DISTRIBUTED=1 python -m fedllava.main --config=$config $*"
