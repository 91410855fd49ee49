"""The device mesh and the shardings every stage uses; multi-host start-up.

One mesh serves all stages. Stage 2 shards the *client* axis of stacked client state over
the ``clients`` mesh axis (1 device, 8 simulated CPU devices or 8 GPUs run the same
program); the server-side teachers shard their frozen weights over a ``model`` axis.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import threadpoolctl
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedllava import errors

CLIENTS = "clients"


def maybe_initialize_distributed() -> None:
  """Starts multi-host JAX when a launcher says so (SLURM, TPU pod, or explicit env vars).

  ``jax.distributed.initialize()`` auto-detects SLURM and Cloud TPU; elsewhere set
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  (see ``launch/``). Single-process runs skip it.
  """
  if os.environ.get("FEDLLAVA_DISTRIBUTED", "0") != "1":
    return
  if jax.distributed.is_initialized():
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes talk through gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    jax.distributed.initialize(
      addr, int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    )
  else:
    jax.distributed.initialize()


def single_threaded_cpu_lapack(devices) -> None:
  """Limits the BLAS that jaxlib's CPU LAPACK kernels call to one thread, on a multi-device CPU.

  A jitted program on several CPU devices (``--xla_force_host_platform_device_count=8``) runs
  every device's copy of a replicated computation at once, so e.g. CCVR's ``eigh`` calls
  jaxlib's LAPACK kernel from 8 threads together. That LAPACK is scipy's OpenBLAS, whose own
  thread server, entered by concurrent callers, deadlocked (gdb: every device thread parked in
  ``ssyevd`` -> ``exec_blas_async``; CCVR's first round on digits never finished). One
  OpenBLAS thread per caller removes it; the matrices here are small (per-class ``[F, F]``)
  and the devices already run in parallel. (A *batched* LAPACK call deadlocks in jaxlib's
  ``ParallelBatchMap`` as well; callers map over single matrices, as ``ccvr.sample_virtual``.)
  Every BLAS that ``threadpoolctl`` (a scikit-learn dependency) finds is limited, numpy's
  included; XLA's own matmuls use neither.
  """
  if len(devices) < 2 or devices[0].platform != "cpu":
    return
  # jaxlib loads that LAPACK lazily, at the first LAPACK op; load it now so that the limit
  # reaches it (threadpoolctl limits the libraries loaded when it is called).
  import scipy.linalg.cython_lapack  # noqa: F401

  threadpoolctl.threadpool_limits(1, user_api="blas")  # process-wide, not a context


def create_client_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (all by default), axis ``clients``.

  On several CPU devices it also makes LAPACK safe to call from all of them at once
  (``single_threaded_cpu_lapack``).
  """
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(
        f"config.mesh.num_devices={num_devices} but only {len(devices)} devices "
        "are visible; lower it or leave it 0 to use all."
      )
    devices = devices[:num_devices]
  single_threaded_cpu_lapack(devices)
  return Mesh(np.asarray(devices), (CLIENTS,))


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (client or batch) axis split over the mesh."""
  return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same array on every device (global model, server state)."""
  return NamedSharding(mesh, P())


def pad_to_multiple(n: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh size that is >= n."""
  d = mesh.size
  return -(-n // d) * d


MODEL = "model"


def fsdp_partition_specs(params, axis_size: int, axis_name: str = MODEL):
  """FSDP-style specs: each array is split over `axis_name` along its largest dimension divisible by
  `axis_size` (the first such on ties); arrays with no such dimension are replicated."""

  def spec(x):
    shape = tuple(x.shape)
    for d in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
      if shape[d] >= axis_size and shape[d] % axis_size == 0:
        parts = [None] * len(shape)
        parts[d] = axis_name
        return P(*parts)
    return P()

  return jax.tree.map(spec, params)


def fsdp_shardings(params, mesh, axis_name: str = MODEL):
  specs = fsdp_partition_specs(params, mesh.shape[axis_name], axis_name)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def create_model_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (all by default), axis ``model``.

  Stage 1's frozen teacher is FSDP-sharded over it (``fsdp_shardings``) and its batches split
  over it (``model_batch_sharding``). ``config.mesh.num_devices`` is checked by ``validate``.
  """
  devices = jax.devices()
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (MODEL,))


def model_batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
  """A batch's leading axis split over the ``model`` axis when ``batch_size`` divides evenly
  over the mesh; otherwise the batch is replicated."""
  if batch_size % mesh.size == 0:
    return NamedSharding(mesh, P(MODEL))
  return replicated(mesh)


def validate(config) -> None:
  """Checks ``config.mesh``; raises ``ValueError`` naming the field and the fix."""
  n = config.mesh.num_devices
  if n < 0:
    raise errors.ConfigError(f"config.mesh.num_devices={n} must be >= 0 (0: all visible devices).")
  if n > jax.device_count():
    raise errors.ConfigError(
      f"config.mesh.num_devices={n} but only {jax.device_count()} devices are visible; "
      "lower it or leave it 0 to use all."
    )


def server_device() -> jax.Device:
  """The one device that runs the server's small computations (stage 3 on D_align).

  D_align is a few images per class and alignment is a short sequential loop of small batches:
  splitting such a batch over the mesh would spend more on communication than on compute, and
  replicating it would repeat the same work on every device. So it runs on this process's first
  local device (on several hosts every process runs the same computation on its own first device,
  which keeps the aligned model identical everywhere); callers put the result back on the mesh.
  """
  return jax.local_devices()[0]
