"""FedProx (Li et al. 2020): local loss + (mu / 2) * ||w - w_global||^2."""

import jax
import jax.numpy as jnp
import optax

from fedllava.algorithms import base


def create(mu: float, server_lr: float = 1.0) -> base.FLAlgorithm:
  """FedProx with proximal weight ``mu``; ``mu = 0`` is FedAvg.

  Local objective: ``h_k(w) = F_k(w) + mu / 2 * ||w - w_t||^2`` (Li et al. 2020, Eq. 2).
  """

  def penalty(params, global_params):
    sq = jax.tree.map(lambda p, g: jnp.sum(jnp.square(p - g)), params, global_params)
    return 0.5 * mu * sum(jax.tree.leaves(sq))

  return base.FLAlgorithm("fedprox", penalty, base.mean_delta, optax.sgd(server_lr))


def from_config(fl) -> base.FLAlgorithm:
  return create(fl.prox_mu, fl.server_lr)
