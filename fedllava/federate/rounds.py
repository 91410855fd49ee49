"""One federated round as one jitted, sharded computation (paper Sec. 3.2, Eq. 3-4).

The sampled clients' data, batch plans and keys are stacked on a leading client axis that
is sharded over the mesh. Inside ``shard_map`` each device trains its share of clients with
the chosen client-parallel strategy; the server update (an ``FLAlgorithm``) then reduces
over the client axis. A padding client (weight 0, no active steps) fills the client axis up
to a multiple of the device count and changes nothing.

Client-parallel strategies (identical results, different speed; ``fl.client_parallelism``
picks one, ``benchmarks/fl_round.py`` times each side by side): ``vmap`` (all local clients at once; per-client conv kernels lower to
grouped convolutions), ``map`` (``lax.map``: one client after another), ``group``
(``lax.map`` over groups of ``group_size`` clients, ``vmap`` inside a group).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fedllava import algorithms, sharding
from fedllava.federate import client

PyTree = Any
STRATEGIES = ("vmap", "map", "group")
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
    if strategy == "map":
      return jax.lax.map(lambda a: f(*a), xs)
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


def create_round_fn(
  trainer: client.LocalTrainer,
  algorithm: algorithms.FLAlgorithm,
  mesh: Mesh,
  strategy: str = "vmap",
  group_size: int = 1,
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
  """
  strategy = resolve_strategy(strategy)
  if strategy not in STRATEGIES:
    raise ValueError(
      f"config.fl.client_parallelism={strategy!r}; choose 'auto' or one of {STRATEGIES}."
    )
  c = sharding.CLIENTS
  clients_fn = jax.shard_map(
    _run_clients(trainer.train, strategy, group_size),
    mesh=mesh,
    in_specs=(P(), P(), P(c), P(c), P(c), P(c), P(c), P(c)),
    out_specs=P(c),
    check_vma=False,
  )
  base = algorithms.base

  def round_fn(variables, server_state, inputs: RoundInputs, server_inputs):
    opt_state, method_state = base.split_server_state(algorithm, server_state)
    message = None if algorithm.message is None else algorithm.message(variables, method_state)
    client_vars, m = clients_fn(
      variables,
      message,
      inputs.images,
      inputs.labels,
      inputs.plan,
      inputs.keys,
      inputs.sizes,
      inputs.side,
    )
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
    return jitted(variables, server_state, inputs, server_inputs)

  return run


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
  rs = np.random.RandomState(seed)
  for _ in range(round_index):
    rs.choice(range(num_clients), per_round, replace=False)
  return rs.choice(range(num_clients), per_round, replace=False)


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
