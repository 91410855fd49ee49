"""Local training of one client: batch plans, on-device augmentation, the masked SGD step.

A client's data is padded to a common length and its local epochs to a common number of
steps, so every client runs the same program (Eq. 3, ``w <- w - eta * grad L_loc``):

* a *batch plan* (built on the host, like a DataLoader with ``shuffle=True`` and no
  ``drop_last``) gives each step's example indices, a per-example weight (0 pads the last
  partial batch) and whether the step is active at all;
* a masked step (``active = False``) changes nothing: parameters, BN statistics and the
  optimizer state are carried over unchanged, and augmentation keys are derived from the
  step index, so there is no RNG state to advance;
* a partial batch of ``m`` examples is a full SGD step on those ``m``: the mean loss over
  them, and BN batch statistics over them only;
* ``train(..., num_iters=n)`` runs the active slots only, in order, for ``n`` iterations (a
  dynamic trip count): the same steps as the scan over every slot when ``n`` is at least the
  client's active steps (``rounds``' ``chunked`` strategy gives a chunk its longest client's).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedllava.algorithms.base import ClientData
from fedllava.data.augment import augment, normalize

PyTree = Any


class BatchPlan(NamedTuple):
  """Which examples each local step sees. Leading axis: steps (or clients, then steps)."""

  idx: np.ndarray  # [S, B] int32 indices into the client's padded data
  weight: np.ndarray  # [S, B] float32, 1 for a real example, 0 for padding
  active: np.ndarray  # [S] bool, False for the steps that only pad the scan


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches in one epoch without ``drop_last``."""
  return math.ceil(num_examples / batch_size)


def make_batch_plan(
  num_examples: int, max_examples: int, epochs: int, batch_size: int, rng: np.random.Generator
) -> BatchPlan:
  """Plans ``epochs`` shuffled passes over ``num_examples`` examples, padded to ``max_examples``.

  Each epoch draws a fresh permutation; its batches are consecutive slices of ``batch_size``
  (the last one shorter); each epoch is padded with inactive steps to
  ``steps_per_epoch(max_examples)`` so all clients share the plan's shape.
  """
  if num_examples <= 0:
    raise ValueError(
      "a client with no examples cannot train; use fewer clients or a larger "
      "Dirichlet alpha (config.data.dirichlet_alpha)."
    )
  slots = steps_per_epoch(max_examples, batch_size)
  idx = np.zeros((epochs, slots, batch_size), np.int32)
  weight = np.zeros((epochs, slots, batch_size), np.float32)
  active = np.zeros((epochs, slots), bool)
  for e in range(epochs):
    perm = rng.permutation(num_examples)
    for j in range(steps_per_epoch(num_examples, batch_size)):
      chunk = perm[j * batch_size : (j + 1) * batch_size]
      idx[e, j, : len(chunk)] = chunk
      weight[e, j, : len(chunk)] = 1.0
      active[e, j] = True
  return BatchPlan(idx.reshape(-1, batch_size), weight.reshape(-1, batch_size), active.reshape(-1))


def _float_dtype(params) -> Any:
  """The parameters' float dtype: inputs are normalised in it (float64 oracles stay exact)."""
  return jnp.result_type(*jax.tree.leaves(params))


class LocalTrainer(NamedTuple):
  """The pure functions of local training for one client (vmap them for many)."""

  # (carry, images, labels, global_params, idx, weight, active, key, message, side=None)
  #   -> (carry, loss); side: the client's per-example side array [N_max, ...] (or None)
  step: Callable
  init_carry: Callable  # (variables) -> carry
  # (variables, images, labels, plan: BatchPlan, key, message=None, size=None, side=None,
  #  num_iters=None) -> (variables, metrics); metrics["upload"] holds the method's extra upload,
  #  if any; num_iters: run only the active steps, this many iterations (rounds' "chunked")
  train: Callable
  # (variables, uint8 images [N, H, W, C]) -> outputs, eval mode; train=True: (outputs, stats)
  model_fn: Callable = None


def create_model_fn(model, mean, std, chunk: int = 256) -> Callable:
  """``model_fn(variables, uint8 images) -> outputs``: the model in eval mode on normalised images,
  ``chunk`` images at a time (a fixed shape, so a client's whole data set fits in memory under
  vmap); each output gets the leading axis of ``images``. ``model_fn(variables, images,
  train=True) -> (outputs, new batch_stats)``: one batch in training mode (BN batch statistics,
  running statistics updated), for a server step that trains (FedDF, FedBE). ``transform``: a
  function of the normalised images ``[n, H, W, C]`` applied before the model, chunk by chunk
  (it must act on each example alone given its fixed draws, as CReFF's DSA with one key)."""

  def model_fn(variables, images, train=False, transform=None):
    if train:  # one batch in training mode: (outputs, new batch_stats)
      x = normalize(images, mean, std, _float_dtype(variables["params"]))
      out, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return out, new["batch_stats"]
    n = images.shape[0]
    c = min(chunk, n)
    steps = -(-n // c)
    dtype = _float_dtype(variables["params"])
    padded = jnp.concatenate([images, jnp.zeros((steps * c - n,) + images.shape[1:], images.dtype)])

    def one(x):
      x = normalize(x, mean, std, dtype)
      return model.apply(variables, x if transform is None else transform(x), train=False)

    out = jax.lax.map(one, padded.reshape((steps, c) + images.shape[1:]))
    return jax.tree.map(lambda y: y.reshape((steps * c,) + y.shape[2:])[:n], out)

  return model_fn


def create_local_trainer(
  model,
  algorithm,
  *,
  learning_rate: float,
  mean,
  std,
  crop_padding: int,
  flip: bool,
  per_batch_augment: bool,
) -> LocalTrainer:
  """Builds the local SGD step and the scanned local training of one client.

  Args:
    model: the Flax FL model (returns a dict with ``logits``).
    algorithm: an ``FLAlgorithm``; its ``local_penalty`` is added to the loss.
    learning_rate: local SGD step size (CReFF: 0.1, no momentum, no weight decay); the
      optimizer state is fresh every round.
    mean, std: per-channel normalisation applied to ``uint8 / 255``.
    crop_padding, flip, per_batch_augment: see ``fedllava.data.augment.augment``.
  Returns:
    A ``LocalTrainer``.
  """
  tx = optax.sgd(learning_rate)
  model_fn = create_model_fn(model, mean, std)

  def loss_fn(params, batch_stats, global_params, x, y, w, message, side):
    out, new_vars = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mask=w, mutable=["batch_stats"]
    )
    if side is None:  # methods without side data keep the 4-argument client_loss
      loss = algorithm.client_loss(out, y, w, message)
    else:
      loss = algorithm.client_loss(out, y, w, message, side=side)
    loss = loss + algorithm.local_penalty(params, global_params)
    return loss, new_vars["batch_stats"]

  def init_carry(variables):
    return (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  def step(carry, images, labels, global_params, idx, weight, active, key, message=None, side=None):
    params, batch_stats, opt_state = carry
    x = normalize(images[idx], mean, std, _float_dtype(params))
    x = augment(x, key, crop_padding, flip, per_batch_augment)
    side_batch = None if side is None else jax.tree.map(lambda a: a[idx], side)
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params,
      batch_stats,
      global_params,
      x,
      labels[idx],
      weight.astype(x.dtype),
      message,
      side_batch,
    )
    updates, new_opt = tx.update(grads, opt_state, params)
    new_carry = (optax.apply_updates(params, updates), new_stats, new_opt)
    carry = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_carry, carry)
    return carry, jnp.where(active, loss, 0.0)

  def _active_steps(variables, images, labels, plan, key, message, side, num_iters):
    """Only the active slots, in slot order, for ``num_iters`` iterations (a dynamic trip count,
    the ``chunked`` strategy's). Iteration t runs the t-th active slot with that slot's own key
    (``fold_in(key, slot)``), so the steps equal the scan's; iterations past this client's
    active steps land on an inactive slot: a masked no-op (the caller's chunk runs its longest
    client's count)."""
    global_params = variables["params"]
    # Active slots first, each group in slot order (stable): the order the scan meets them.
    order = jnp.argsort(jnp.logical_not(plan.active), stable=True).astype(jnp.int32)

    def body(t, state):
      carry, loss_sum = state
      s = order[jnp.minimum(t, order.shape[0] - 1)]
      k = jax.random.fold_in(key, s)
      carry, loss = step(
        carry,
        images,
        labels,
        global_params,
        plan.idx[s],
        plan.weight[s],
        plan.active[s],
        k,
        message,
        side,
      )
      return carry, loss_sum + loss.astype(loss_sum.dtype)

    zero = jnp.zeros((), _float_dtype(global_params))
    (params, stats, _), loss_sum = jax.lax.fori_loop(
      0, num_iters, body, (init_carry(variables), zero)
    )
    return params, stats, loss_sum

  def train(
    variables,
    images,
    labels,
    plan: BatchPlan,
    key,
    message=None,
    size=None,
    side=None,
    num_iters=None,
  ):
    global_params = variables["params"]
    num_slots = plan.active.shape[0]
    if num_iters is None:  # every slot of the plan, masked ones included (a static scan)
      keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(num_slots))

      def body(carry, xs):
        idx, weight, active, k = xs
        return step(carry, images, labels, global_params, idx, weight, active, k, message, side)

      (params, stats, _), losses = jax.lax.scan(
        body, init_carry(variables), (plan.idx, plan.weight, plan.active, keys)
      )
      loss_sum = jnp.sum(losses)
    else:
      params, stats, loss_sum = _active_steps(
        variables, images, labels, plan, key, message, side, num_iters
      )
    num_steps = jnp.sum(plan.active.astype(jnp.int32))
    metrics = {"loss": loss_sum / jnp.maximum(num_steps, 1), "num_steps": num_steps}
    local = {"params": params, "batch_stats": stats}
    if algorithm.client_upload is not None:
      n = images.shape[0] if size is None else size
      valid = (jnp.arange(images.shape[0]) < n).astype(_float_dtype(params))
      data = ClientData(images, labels, valid, jax.random.fold_in(key, num_slots))
      metrics["upload"] = algorithm.client_upload(model_fn, variables, local, data, message)
    return local, metrics

  return LocalTrainer(step, init_carry, train, model_fn)
