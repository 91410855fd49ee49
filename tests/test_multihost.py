"""Multi-host through JAX's own runtime: two CPU processes on localhost (a local coordinator)
form one mesh and run the same round as one process with as many devices."""

import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")


def _env(devices, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  single = subprocess.run(
    [sys.executable, WORKER, str(tmp_path / "one"), str(tmp_path / "one.npz")],
    env=_env(4),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  addr = f"127.0.0.1:{_free_port()}"
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, str(tmp_path / "two"), str(tmp_path / f"two{i}.npz")],
      env=_env(
        2,
        FEDLLAVA_DISTRIBUTED="1",
        JAX_COORDINATOR_ADDRESS=addr,
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
      ),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "process 0 of 2: 4 devices" in outs[0][0]
  ref = np.load(tmp_path / "one.npz")
  for i in range(2):
    got = np.load(tmp_path / f"two{i}.npz")
    assert len(got.files) == len(ref.files)
    for k in ref.files:
      np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-6)
  two = tmp_path / "two"
  # Process 0 writes the run's files once; the checkpoint holds each round once.
  assert (two / "config.json").exists() and (two / "federate" / "metrics.jsonl").exists()
  steps = [s for s in os.listdir(two / "federate" / "checkpoints") if s.isdigit()]
  assert sorted(steps) == ["1", "2"]
  rows = (two / "federate" / "metrics.jsonl").read_text().splitlines()
  assert len(rows) == 2
