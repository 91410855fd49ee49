"""FedNova (Wang et al. 2020): normalised averaging that removes objective inconsistency.

For local SGD without momentum client k's normalised update is
``d_k = (w - w_k) / tau_k`` with ``tau_k`` its number of local steps; the server moves
``w <- w - tau_eff * sum_k p_k d_k`` with ``tau_eff = sum_k p_k tau_k``
(Wang et al. 2020, Eq. 6-7 with a_k = tau_k). Equal ``tau_k`` gives FedAvg.
"""

import jax
import jax.numpy as jnp
import optax

from fedllava.algorithms import base


def normalised_delta(global_params, client_params, weights, num_steps):
  """``tau_eff * sum_k p_k (w - w_k) / tau_k``; clients with no steps contribute nothing."""
  tau = jnp.maximum(num_steps.astype(jnp.float32), 1.0)
  tau_eff = jnp.sum(weights * num_steps)
  coef = weights / tau

  def leaf(g, c):
    d = jnp.tensordot(coef.astype(c.dtype), g[None] - c, axes=1)
    return tau_eff.astype(c.dtype) * d

  return jax.tree.map(leaf, global_params, client_params)


def create(server_lr: float = 1.0) -> base.FLAlgorithm:
  """FedNova for plain local SGD."""
  return base.FLAlgorithm("fednova", base.no_penalty, normalised_delta, optax.sgd(server_lr))


def from_config(fl) -> base.FLAlgorithm:
  return create(fl.server_lr)
