"""One federated round as one jitted, sharded computation (paper Sec. 3.2, Eq. 3-4).

The sampled clients' data, batch plans and keys are stacked on a leading client axis that
is sharded over the mesh. Inside ``shard_map`` each device trains its share of clients with
the chosen client-parallel strategy; the server update (an ``FLAlgorithm``) then reduces
over the client axis. A padding client (weight 0, no active steps) fills the client axis up
to a multiple of the device count and changes nothing.

Client-parallel strategies (identical results, different speed; ``fl.client_parallelism``
picks one, ``benchmarks/fl_round.py`` times each side by side): ``vmap`` (all local clients at once; per-client conv kernels lower to
grouped convolutions), ``map`` (``lax.map``: one client after another, each running only its
own active steps), ``group``
(``lax.map`` over groups of ``group_size`` clients, ``vmap`` inside a group), ``chunked``
(``group`` over clients sorted by step count, each chunk running only its own active steps:
a round of many small unequal clients costs their steps, not clients x the largest;
``_chunked``). ``group_size=0`` picks the chunk size from the device's memory and the clients'
step counts at the first call (``auto_group_size``; ``run.info`` holds the choice).
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedllava import algorithms, sharding
from fedllava.federate import client

PyTree = Any
STRATEGIES = ("vmap", "map", "group", "chunked")
# What ``fl.client_parallelism = "auto"`` resolves to, per backend: what benchmarks/fl_round.py
# measured fastest there (benchmarks/README.md). CPU: ``map`` (one client after another: plain
# convolutions that XLA:CPU hands to Eigen; vmapped per-client kernels become grouped
# convolutions); GPU (H200, fp32): ``map`` 4.00 s/round vs ``vmap`` 5.09 and ``group:4`` 6.06.
AUTO = {"cpu": "map", "gpu": "map", "cuda": "map", "rocm": "map", "tpu": "vmap"}


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
  """``fl.client_parallelism`` with ``"auto"`` resolved for ``backend`` (default: JAX's)."""
  if strategy != "auto":
    return strategy
  backend = backend or jax.default_backend()
  return AUTO.get(backend, "vmap")


class RoundInputs(NamedTuple):
  """Everything stacked on the client axis for one round."""

  images: Any  # [M, N_max, H, W, C] uint8
  labels: Any  # [M, N_max] int32
  plan: client.BatchPlan  # idx/weight [M, S, B], active [M, S]
  keys: Any  # [M] PRNG keys (augmentation)
  weights: Any  # [M] float32, |D_k| / sum |D_k|, 0 for padding clients
  sizes: Any = None  # [M] int32 |D_k| (0 for padding clients): what client_upload counts
  side: Any = (
    None  # [M, N_max, ...] the method's per-example side data (base.FLAlgorithm.side_data)
  )


def _run_clients(train: Callable, strategy: str, group_size: int) -> Callable:
  """Maps single-client ``train`` over a (device-local) client axis."""

  def per_client(variables, message, images, labels, plan, keys, sizes, side):
    f = lambda im, lb, pl, k, n, sd: train(variables, im, lb, pl, k, message, n, sd)  # noqa: E731
    xs = (images, labels, plan, keys, sizes, side)
    if strategy == "vmap":
      return jax.vmap(f)(*xs)
    if strategy == "map":  # one client at a time, each running only its own active steps
      one = _own_active_steps(train)
      return jax.lax.map(lambda a: one(variables, message, *a), xs)
    if strategy == "chunked":
      return _chunked(train, variables, message, xs, group_size)
    n = images.shape[0]
    g = min(group_size, n)
    if n % g:
      raise ValueError(
        f"config.fl.group_size={group_size} must divide the clients per device ({n})."
      )
    grouped = jax.tree.map(lambda x: x.reshape((n // g, g) + x.shape[1:]), xs)
    out = jax.lax.map(lambda a: jax.vmap(f)(*a), grouped)
    return jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), out)

  return per_client


def _own_active_steps(train: Callable) -> Callable:
  """One client's local training over its own active steps only (``map``'s per-client call)."""

  def one(variables, message, images, labels, plan, key, size, side):
    trips = jnp.sum(plan.active.astype(jnp.int32))
    return train(variables, images, labels, plan, key, message, size, side, num_iters=trips)

  return one


def _run_clients_per_client(train: Callable) -> Callable:
  """``map`` over clients that each bring their own global model and message (several runs
  flattened into one client axis: ``_flat_runs_round``)."""

  def per_client(variables, message, images, labels, plan, keys, sizes, side):
    one = _own_active_steps(train)
    return jax.lax.map(
      lambda a: one(*a), (variables, message, images, labels, plan, keys, sizes, side)
    )

  return per_client


def _flat_runs_round(
  clients_fn: Callable, message_of: Callable, server_fn: Callable, client_axis
) -> Callable:
  """R runs' round with ``map``: the R x M clients flattened into one client axis, each with its
  own run's global model and message, trained one after another (no run axis inside a client's
  computation, so no batched convolution kernels: the CPU's fast path); then each run
  aggregates its own M clients (``server_fn`` vmapped over runs, no reduction across runs),
  from the clients' outputs laid out as a run alone lays them out (``client_axis``: runs
  replicated, clients sharded), so each run's weighted sums add in the same order as alone.

  Every argument has a leading run axis; the inputs a second, client axis.
  """

  def round_fn(variables, server_state, inputs: RoundInputs, server_inputs):
    r, m = inputs.weights.shape[:2]
    messages = jax.vmap(message_of)(variables, server_state)
    per_client = lambda x: jnp.repeat(x, m, axis=0)  # noqa: E731  [R, ...] -> [R * M, ...]
    flat = lambda x: x.reshape((r * m,) + x.shape[2:])  # noqa: E731
    xs = (inputs.images, inputs.labels, inputs.plan, inputs.keys, inputs.sizes, inputs.side)
    client_vars, out = clients_fn(
      jax.tree.map(per_client, variables),
      jax.tree.map(per_client, messages),
      *jax.tree.map(flat, xs),
    )
    unflat = lambda x: x.reshape((r, m) + x.shape[1:])  # noqa: E731
    client_vars, out = jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(unflat(x), client_axis), (client_vars, out)
    )
    return jax.vmap(server_fn)(variables, server_state, inputs, server_inputs, client_vars, out)

  return round_fn


def _chunked(train: Callable, variables, message, xs, group_size: int):
  """The ``chunked`` strategy: clients sorted by local step count, cut into chunks of
  ``group_size``, a ``lax.map`` over the chunks and ``vmap`` inside one; a chunk runs only its
  longest client's number of active steps (``train(..., num_iters=)``), not the plan's padded
  slots. So a round costs about the sum of the clients' steps, however many clients it has.

  The sort is a permutation of independent clients: outputs are put back in the input order
  before the server reduces over them, so aggregation order and results are unchanged. A
  chunk's client images are gathered inside the loop (one chunk at a time, not a sorted copy
  of the round). When ``group_size`` does not divide the clients, the last chunk is filled
  with copies of client 0 whose outputs are dropped and whose steps do not count in the trip.
  """
  images, labels, plan = xs[:3]
  n = images.shape[0]
  g = max(1, min(group_size, n))
  num_chunks = -(-n // g)
  steps = jnp.sum(plan.active.astype(jnp.int32), axis=-1)
  order = jnp.argsort(-steps, stable=True).astype(jnp.int32)  # longest first, ties in order
  fill = num_chunks * g - n
  ids = jnp.concatenate([order, jnp.zeros((fill,), jnp.int32)]).reshape(num_chunks, g)
  real = (jnp.arange(num_chunks * g) < n).reshape(num_chunks, g)

  def f(im, lb, pl, k, sz, sd, trips):
    return train(variables, im, lb, pl, k, message, sz, sd, num_iters=trips)

  def chunk(a):
    cid, ok = a
    sub = jax.tree.map(lambda x: x[cid], xs)
    trips = jnp.max(jnp.where(ok, steps[cid], 0))  # fillers (outputs dropped) do not count
    return jax.vmap(f, in_axes=(0, 0, 0, 0, 0, 0, None))(*sub, trips)

  out = jax.lax.map(chunk, (ids, real))
  inverse = jnp.argsort(order)  # sorted position of each input client
  return jax.tree.map(lambda x: x.reshape((num_chunks * g,) + x.shape[2:])[inverse], out)


def create_round_fn(
  trainer: client.LocalTrainer,
  algorithm: algorithms.FLAlgorithm,
  mesh: Mesh,
  strategy: str = "vmap",
  group_size: int = 1,
  *,
  runs: bool = False,
) -> Callable:
  """Builds ``round_fn(variables, server_state, inputs, server_inputs=None)
  -> (variables, server_state, metrics)``, one jitted computation.

  Local training: Eq. 3 on every sampled client (with the method's client loss and penalty;
  its extra upload computed at the end of each client). Aggregation: the method's server
  update on the parameters (FedAvg: ``w = sum_k |D_k| / sum |D_k| * w_k``, Eq. 4) and the same
  weighted mean over BN running statistics (CReFF averages the whole state dict). Then the
  method's server step, if any, on the aggregated model, the client models, the uploads and
  ``server_inputs = {"data": server images or None, "key": this round's server key}``.
  A method with ``aggregate`` (client-level DP) replaces the weighted means: it sees the whole
  client models, its state and the same key, and its metrics are returned as they are named.
  Only what the clients upload reaches the server: parameters, statistics and, for the
  methods that declare them, per-class statistics or gradients (``client_upload``).

  ``runs=True``: R runs' rounds in one computation, every argument with a leading run axis
  (``create_multirun_round_fn``): with ``map``, runs x clients flattened into the one client
  axis, each client with its run's model, then each run aggregating its own clients
  (``_flat_runs_round``); with the other strategies, the round ``jax.vmap``-ed over runs.
  """
  strategy = resolve_strategy(strategy)
  if strategy not in STRATEGIES:
    raise ValueError(
      f"config.fl.client_parallelism={strategy!r}; choose 'auto' or one of {STRATEGIES}."
    )
  c = sharding.CLIENTS
  # group_size 0 (auto, "group" / "chunked"): chosen from the first round's shapes and the
  # device's memory (``auto_group_size``); ``run.info`` says what was chosen and why.
  info = {} if group_size == 0 and strategy in ("group", "chunked") else {"group_size": group_size}

  def clients_fn(*args):
    return jax.shard_map(
      _run_clients(trainer.train, strategy, info["group_size"]),
      mesh=mesh,
      in_specs=(P(), P(), P(c), P(c), P(c), P(c), P(c), P(c)),
      out_specs=P(c),
      check_vma=False,
    )(*args)

  def clients_fn_per_client(*args):  # variables and message carry the client axis too
    return jax.shard_map(
      _run_clients_per_client(trainer.train),
      mesh=mesh,
      in_specs=(P(c),) * 8,
      out_specs=P(c),
      check_vma=False,
    )(*args)

  base = algorithms.base

  def message_of(variables, server_state):
    method_state = base.split_server_state(algorithm, server_state)[1]
    return None if algorithm.message is None else algorithm.message(variables, method_state)

  def round_fn(variables, server_state, inputs: RoundInputs, server_inputs):
    client_vars, m = clients_fn(
      variables,
      message_of(variables, server_state),
      inputs.images,
      inputs.labels,
      inputs.plan,
      inputs.keys,
      inputs.sizes,
      inputs.side,
    )
    return server_fn(variables, server_state, inputs, server_inputs, client_vars, m)

  def server_fn(variables, server_state, inputs: RoundInputs, server_inputs, client_vars, m):
    """Aggregation and the server step on the clients' outputs (one run)."""
    opt_state, method_state = base.split_server_state(algorithm, server_state)
    m = dict(m)
    uploads = m.pop("upload", {})
    metrics = {
      "train/loss": jnp.sum(inputs.weights * m["loss"]),
      "train/client_loss": m["loss"],
      "train/client_steps": m["num_steps"],
    }
    if algorithm.aggregate is None:
      params, opt_state = base.server_update(
        algorithm,
        variables["params"],
        opt_state,
        client_vars["params"],
        inputs.weights,
        m["num_steps"],
      )
      stats = base.weighted_mean(client_vars["batch_stats"], inputs.weights)
    else:  # the whole model, the method's state and the round's key (client-level DP)
      ctx = base.AggregateContext(
        variables, client_vars, inputs.weights, m["num_steps"], method_state, server_inputs["key"]
      )
      delta, stats, method_state, agg_metrics = algorithm.aggregate(ctx)
      updates, opt_state = algorithm.server_optimizer.update(delta, opt_state, variables["params"])
      params = optax.apply_updates(variables["params"], updates)
      metrics.update(agg_metrics)
    new_vars = {"params": params, "batch_stats": stats}
    if algorithm.server_step is not None:
      ctx = base.ServerContext(
        new_vars,
        method_state,
        client_vars,
        uploads,
        inputs.weights,
        server_inputs["data"],
        server_inputs["key"],
      )
      new_vars, method_state, server_metrics = algorithm.server_step(ctx, trainer.model_fn)
      metrics.update({f"server/{k}": v for k, v in server_metrics.items()})
    server_state = base.join_server_state(algorithm, opt_state, method_state)
    metrics["finite"] = all_finite((new_vars, method_state))
    return new_vars, server_state, metrics

  repl = sharding.replicated(mesh)
  if runs and strategy == "map":  # several runs, clients one at a time: runs x clients flattened
    cs = NamedSharding(mesh, P(None, c))
    round_fn = _flat_runs_round(clients_fn_per_client, message_of, server_fn, cs)
  elif runs:  # several runs: one lane each, the client axis second (see create_multirun_round_fn)
    round_fn = jax.vmap(round_fn)
    cs = NamedSharding(mesh, P(None, c))
  else:
    cs = sharding.client_sharding(mesh)
  jitted = jax.jit(
    round_fn,
    in_shardings=(repl, repl, cs, repl),
    out_shardings=(repl, repl, repl),
    donate_argnums=(0, 1),
  )

  def run(variables, server_state, inputs: RoundInputs, server_inputs=None):
    if server_inputs is None:
      server_inputs = {"data": None, "key": None}
    if "group_size" not in info:
      v, st, x, budget = variables, server_state, inputs, None
      if runs:  # every lane holds a chunk at once: lane 0's shapes, 1/R of the memory each
        lanes = jax.tree.leaves(variables)[0].shape[0]
        v, st, x = jax.tree.map(lambda a: a[0], (variables, server_state, inputs))
        free, source = memory_budget()
        budget = (free // lanes, f"{source} / {lanes} runs")
      method_state = base.split_server_state(algorithm, st)[1]
      message = None if algorithm.message is None else algorithm.message(v, method_state)
      info.update(
        auto_group_size(
          trainer, v, message, x, mesh.size, divisor=strategy == "group", budget=budget
        )
      )
    return jitted(variables, server_state, inputs, server_inputs)

  run.info = info
  return run


# --------------------------------------------------------------------------------------------
# The chunk size from the device's memory (``fl.group_size = 0``).

MEMORY_FRACTION = 0.5  # of the free memory the client chunks may take (estimates are rough)


def memory_budget(device=None) -> tuple[int, str]:
  """Free bytes one device can give the round, and where the figure comes from.

  An accelerator: ``memory_stats()["bytes_limit"] - bytes_in_use`` (the client store and the
  round's inputs are already in use). A CPU (no memory stats): the host's available memory
  (``MemAvailable`` of /proc/meminfo) shared by the local devices.
  """
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (not implemented on some backends)
    stats = None
  if stats and stats.get("bytes_limit"):
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return free, f"{device.platform} bytes_limit - bytes_in_use"
  return _host_available_bytes() // len(jax.local_devices()), "host MemAvailable / local devices"


def _host_available_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def chunk_bytes(trainer: client.LocalTrainer, variables, message, one_client, g: int) -> int:
  """Bytes XLA plans for one chunk of ``g`` clients: arguments (their data and plans), outputs
  (their models and metrics) and temporaries (the local step's activations and gradients),
  from ``compiled.memory_analysis()`` of the vmapped local training (compiled, not run).

  Args:
    one_client: ``(images, labels, plan, key, size, side)`` of one client (arrays or shape
      structs, no client axis).
  """
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((g,) + x.shape, x.dtype), one_client)

  def f(v, msg, xs, trips):
    fn = lambda im, lb, pl, k, n, sd: trainer.train(v, im, lb, pl, k, msg, n, sd, num_iters=trips)  # noqa: E731
    return jax.vmap(fn)(*xs)

  compiled = (
    jax.jit(f)
    .lower(
      jax.tree.map(spec, variables),
      jax.tree.map(spec, message),
      stacked,
      jax.ShapeDtypeStruct((), jnp.int32),
    )
    .compile()
  )
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


# Examples per local step at which one device is busy: a chunk of g clients runs an iteration
# in about (saturation + g) units, so below saturation more clients come almost free (GPU) and
# above it each client costs its share (a CPU is busy with one batch). A first guess per
# backend, for benchmarks/fl_clients.py's --group_sizes sweep to calibrate; fl.group_size > 0
# overrides the whole choice.
SATURATION_EXAMPLES = {"cpu": 32, "gpu": 2048, "tpu": 2048}


def choose_group_size(
  clients: int,
  per_client_bytes: int,
  fixed_bytes: int,
  budget_bytes: int,
  *,
  steps=None,
  saturation: float = 1.0,
  fraction: float = MEMORY_FRACTION,
  divisor: bool = False,
) -> int:
  """The chunk size: the cheapest that fits in memory.

  Memory: ``fixed + g * per_client <= fraction * budget`` (at least 1: one client at a time
  is the ``map`` strategy's memory). Among the sizes that fit, evened out over the chunks
  they need (``ceil(clients / k)`` for k chunks, so the last chunk is not mostly filler), the
  one with the least modelled time ``sum over chunks of max steps x (saturation + g)`` for
  ``steps``, the clients' active steps (sorted longest first, as ``_chunked`` does); the
  larger on a tie. Without ``steps``: the largest that fits. ``divisor=True`` (the ``group``
  strategy, no sorting): the largest divisor of ``clients`` that fits.
  """
  room = fraction * budget_bytes - fixed_bytes
  g_mem = int(room // max(per_client_bytes, 1)) if room > 0 else 1
  g_mem = max(1, min(g_mem, clients))
  if divisor:
    return max(d for d in range(1, g_mem + 1) if clients % d == 0)
  sizes = sorted({-(-clients // k) for k in range(1, clients + 1)} & set(range(1, g_mem + 1)))
  if steps is None:
    return sizes[-1]
  st = np.sort(np.asarray(steps, np.int64))[::-1]
  best, best_cost = sizes[-1], None
  for g in reversed(sizes):  # largest first: it wins ties
    cost = (saturation + g) * float(np.sum(st[::g]))  # st[c * g]: chunk c's longest client
    if best_cost is None or cost < best_cost:
      best, best_cost = g, cost
  return best


def auto_group_size(
  trainer: client.LocalTrainer,
  variables,
  message,
  inputs: RoundInputs,
  num_devices: int,
  *,
  divisor: bool = False,
  budget: tuple[int, str] | None = None,
  platform: str | None = None,
) -> dict:
  """``fl.group_size = 0``: the chunk size for this round's shapes, step counts and the
  device's memory (decided at the first round, kept for the run: later rounds draw from the
  same clients).

  The memory of a chunk is linear in its clients: ``chunk_bytes`` at 1 and 2 clients gives the
  per-client cost (data, plan, model copies, step activations) and the fixed part. The round
  also keeps every client's output model twice (sorted, then in input order): that is reserved
  first. Time: ``choose_group_size``'s model with the busiest device's clients' step counts
  and ``SATURATION_EXAMPLES`` of the backend over the batch size. On a CPU (``platform``,
  default the device's) ``chunked`` takes one client per chunk: vmapped per-client kernels
  become grouped convolutions there, 3-8x slower per client than one client at a time
  (benchmarks/README.md), so the chunks only sort and trim the steps. Returns ``{"group_size",
  "per_client_bytes", "fixed_bytes", "budget_bytes", "budget_source", ...}`` (``run.info``;
  the loop prints it).
  """
  m = inputs.images.shape[0]
  per_device = -(-m // num_devices)
  one = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
    (inputs.images, inputs.labels, inputs.plan, inputs.keys, inputs.sizes, inputs.side),
  )
  b1 = chunk_bytes(trainer, variables, message, one, 1)
  b2 = chunk_bytes(trainer, variables, message, one, 2)
  per_client = max(b2 - b1, 1)
  fixed = max(b1 - per_client, 0) + 2 * per_device * upload_bytes(variables)
  free, source = budget if budget is not None else memory_budget()
  steps = np.asarray(inputs.plan.active).sum(-1).reshape(num_devices, -1)
  busiest = steps[int(np.argmax(steps.sum(-1)))]
  platform = platform or jax.local_devices()[0].platform
  batch = inputs.plan.idx.shape[-1]
  saturation = SATURATION_EXAMPLES.get(platform, SATURATION_EXAMPLES["gpu"]) / batch
  g = choose_group_size(
    per_device,
    per_client,
    fixed,
    free,
    steps=None if divisor else busiest,
    saturation=saturation,
    divisor=divisor,
  )
  if platform == "cpu" and not divisor:
    g = 1
  return {
    "group_size": g,
    "per_client_bytes": per_client,
    "fixed_bytes": fixed,
    "budget_bytes": free,
    "budget_source": source,
    "memory_fraction": MEMORY_FRACTION,
    "saturation_clients": saturation,
  }


def create_multirun_round_fn(
  trainer: client.LocalTrainer,
  algorithm: algorithms.FLAlgorithm,
  mesh: Mesh,
  strategy: str = "vmap",
  group_size: int = 1,
) -> Callable:
  """R independent runs' rounds as one jitted computation, every argument (variables, server
  state, inputs, server inputs) and output with a leading run axis (``metrics["finite"]`` is
  ``[R]``): with ``map`` the runs' clients flattened into one client axis
  (``_flat_runs_round``), otherwise ``create_round_fn``'s round ``jax.vmap``-ed over runs.

  Runs never mix: each run aggregates its own clients (no reduction over runs), and a run
  holding NaNs leaves the others untouched. The client axis (second) stays sharded
  over the mesh, so every device trains its share of every run's clients. The caller stacks
  runs whose inputs have the same shapes (``multirun.py`` pads the client stores).
  """
  return create_round_fn(trainer, algorithm, mesh, strategy, group_size, runs=True)


def all_finite(tree: PyTree) -> jax.Array:
  """One fused reduction: True iff every element of every leaf is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def first_nonfinite_leaf(tree: PyTree) -> str | None:
  """The key path of the first leaf holding a NaN or inf (host side, for the error message)."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not np.all(np.isfinite(np.asarray(x))):
      return jax.tree_util.keystr(path)
  return None


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
  """Round ``round_index``'s clients, as CReFF draws them, in CReFF's draw order.

  CReFF keeps one ``RandomState(seed)`` and calls ``choice(range(K), m, replace=False)``
  every round; replaying the draws from the seed gives the same sequence after a resume.
  The order is kept (not sorted): it is the order of FedAvg's weighted sum.
  """
  key = (seed, num_clients, per_round)
  start, state = _SAMPLER_STATE.get(key, (0, None))
  rs = np.random.RandomState(seed)
  if state is not None and start <= round_index:  # continue from the last call (the loop's
    rs.set_state(state)  # next round): O(1) per round instead of replaying every draw
  else:
    start = 0
  for _ in range(start, round_index):
    rs.choice(num_clients, per_round, replace=False)
  out = rs.choice(num_clients, per_round, replace=False)
  _SAMPLER_STATE[key] = (round_index + 1, rs.get_state())
  return out


_SAMPLER_STATE: dict = {}  # (seed, K, m) -> (next round, RandomState state after its draw)


def build_round_inputs(
  selected: Sequence[int],
  sizes: np.ndarray,
  max_size: int,
  *,
  epochs: int,
  batch_size: int,
  seed: int,
  round_index: int,
  pad_to: int,
  aug_key: jax.Array,
) -> tuple[RoundInputs, np.ndarray]:
  """Batch plans, keys and FedAvg weights for the selected clients, padded to ``pad_to``.

  Returns ``(inputs, client_ids)`` where ``inputs.images``/``labels`` are left as None for the
  caller to fill (they live on device) and ``client_ids`` has length ``pad_to`` (padding
  clients repeat client ``selected[0]`` with weight 0 and no active step).
  """
  selected = list(selected)
  plans, ids = [], []
  for cid in selected:
    rng = np.random.default_rng([seed, round_index, int(cid)])
    plans.append(client.make_batch_plan(int(sizes[cid]), max_size, epochs, batch_size, rng))
    ids.append(int(cid))
  empty = client.BatchPlan(
    np.zeros_like(plans[0].idx), np.zeros_like(plans[0].weight), np.zeros_like(plans[0].active)
  )
  while len(ids) < pad_to:
    plans.append(empty)
    ids.append(selected[0])
  n = np.asarray([sizes[c] for c in selected], np.float64)
  weights = np.zeros(pad_to, np.float64)
  weights[: len(selected)] = n / n.sum()
  counts = np.zeros(pad_to, np.int32)
  counts[: len(selected)] = n
  plan = client.BatchPlan(*(np.stack(x) for x in zip(*plans)))
  round_key = jax.random.fold_in(aug_key, round_index)
  keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(jnp.asarray(ids))
  return RoundInputs(None, None, plan, keys, weights, counts), np.asarray(ids)


def upload_bytes(variables: PyTree) -> int:
  """Bytes of a tree (one client's parameters and BN statistics: what every method uploads)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables)))


def upload_bytes_by_kind(
  trainer: client.LocalTrainer, algorithm, variables: PyTree, client_images, server_state
) -> dict:
  """Bytes one client uploads per round, by kind: ``parameters`` (with BN statistics), and the
  method's ``statistics`` / ``gradients`` (shapes from ``jax.eval_shape``: nothing runs).

  Args:
    client_images: one client's padded images ``[N_max, H, W, C]`` (or their shape struct).
  """
  out = {"parameters": upload_bytes(variables), "statistics": 0, "gradients": 0}
  if algorithm.client_upload is None:
    return out
  base = algorithms.base
  n = client_images.shape[0]
  method_state = base.split_server_state(algorithm, server_state)[1]
  message = None if algorithm.message is None else algorithm.message(variables, method_state)
  data = base.ClientData(
    jax.ShapeDtypeStruct(client_images.shape, client_images.dtype),
    jax.ShapeDtypeStruct((n,), jnp.int32),
    jax.ShapeDtypeStruct((n,), jnp.float32),
    jax.random.PRNGKey(0),
  )
  shapes = jax.eval_shape(
    lambda v, d, msg: algorithm.client_upload(trainer.model_fn, v, v, d, msg),
    variables,
    data,
    message,
  )
  for kind, tree in shapes.items():
    if kind not in base.UPLOAD_KINDS:
      raise ValueError(f"{algorithm.name}: upload kind {kind!r} is not one of {base.UPLOAD_KINDS}")
    out[kind] += upload_bytes(tree)
  return out
