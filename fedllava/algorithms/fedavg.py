"""FedAvg (McMahan et al. 2017): local SGD, server takes the size-weighted mean (Eq. 4)."""

import optax

from fedllava.algorithms import base


def create(server_lr: float = 1.0) -> base.FLAlgorithm:
  """FedAvg; ``server_lr`` 1.0 is the paper's plain weighted average."""
  return base.FLAlgorithm("fedavg", base.no_penalty, base.mean_delta, optax.sgd(server_lr))


def from_config(fl) -> base.FLAlgorithm:
  return create(fl.server_lr)
