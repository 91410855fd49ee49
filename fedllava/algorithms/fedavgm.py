"""FedAvgM (Hsu et al. 2019): server momentum on the averaged client delta.

``v <- beta * v + delta``; ``w <- w - server_lr * v``, with ``delta = w - sum_k p_k w_k``.
"""

import optax

from fedllava.algorithms import base


def create(momentum: float, server_lr: float = 1.0) -> base.FLAlgorithm:
  """FedAvgM; ``momentum = 0`` with ``server_lr = 1`` is FedAvg."""
  return base.FLAlgorithm(
    "fedavgm", base.no_penalty, base.mean_delta, optax.sgd(server_lr, momentum=momentum)
  )


def from_config(fl) -> base.FLAlgorithm:
  return create(fl.server_momentum, fl.server_lr)
