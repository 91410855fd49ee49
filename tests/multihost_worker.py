"""One process of the multi-host test (tests/test_multihost.py): stage 2 on tiny digits-LT."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fedllava import sharding  # noqa: E402

sharding.maybe_initialize_distributed()  # before anything touches a device

import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import tiny_digits  # noqa: E402

from fedllava import main  # noqa: E402

cfg = tiny_digits(2, stages="federate", **{"mesh.num_devices": 0, "checkpoint.every": 1})
out = main.run(cfg, sys.argv[1])["federate"]
leaves = [np.asarray(x) for x in jax.tree.leaves(out.variables)]
np.savez(sys.argv[2], *leaves)
print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices")
