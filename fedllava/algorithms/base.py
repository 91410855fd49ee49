"""The shape every FL method takes: a local objective term and a server update.

A method is a small bundle of pure functions over parameter pytrees (fedjax's
``FederatedAlgorithm``, optax's ``GradientTransformation``):

* ``local_penalty(params, global_params) -> scalar`` is added to each client's loss
  (FedProx's proximal term; zero for FedAvg);
* ``pseudo_gradient(global_params, client_params, weights, num_steps) -> delta`` turns the
  stacked client parameters (leading client axis) into one server "gradient";
* ``server_optimizer`` is an optax transformation applied to that delta (FedAvg:
  ``sgd(1.0)``, so ``w <- w - (w - sum_k p_k w_k) = sum_k p_k w_k``, the paper's Eq. 4).

Clients upload parameters only: everything above consumes client *parameters*, never
client gradients.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class FLAlgorithm(NamedTuple):
  """A federated method as pure functions (see module docstring)."""

  name: str
  local_penalty: Callable[[PyTree, PyTree], jax.Array]
  pseudo_gradient: Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]
  server_optimizer: optax.GradientTransformation


def no_penalty(params: PyTree, global_params: PyTree) -> jax.Array:
  """The FedAvg local objective adds nothing."""
  del params, global_params
  return jnp.zeros((), jnp.float32)


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
  """``sum_k weights[k] * stacked[k]`` for every leaf (weights sum to one)."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def mean_delta(
  global_params: PyTree, client_params: PyTree, weights: jax.Array, num_steps: jax.Array
) -> PyTree:
  """FedAvg's pseudo-gradient ``w_g - sum_k p_k w_k`` with ``p_k = |D_k| / sum |D_k|`` (Eq. 4)."""
  del num_steps
  avg = weighted_mean(client_params, weights)
  return jax.tree.map(lambda g, a: g - a, global_params, avg)


def server_update(
  algorithm: FLAlgorithm,
  global_params: PyTree,
  server_state: PyTree,
  client_params: PyTree,
  weights: jax.Array,
  num_steps: jax.Array,
):
  """Applies one server step; returns ``(new_global_params, new_server_state)``."""
  delta = algorithm.pseudo_gradient(global_params, client_params, weights, num_steps)
  updates, server_state = algorithm.server_optimizer.update(delta, server_state, global_params)
  return optax.apply_updates(global_params, updates), server_state
