"""FL methods, each a small module returning a ``FLAlgorithm``; ``create`` picks one by name.

Adding a method: write ``fedllava/algorithms/<name>.py`` with ``create(...)`` returning a
``base.FLAlgorithm`` and add one line to ``_FACTORIES``.
"""

from fedllava.algorithms import base, fedavg, fedavgm, fednova, fedprox
from fedllava.algorithms.base import FLAlgorithm, server_update

_FACTORIES = {
  "fedavg": lambda c: fedavg.create(c.server_lr),
  "fedprox": lambda c: fedprox.create(c.prox_mu, c.server_lr),
  "fedavgm": lambda c: fedavgm.create(c.server_momentum, c.server_lr),
  "fednova": lambda c: fednova.create(c.server_lr),
}
ALGORITHMS = tuple(_FACTORIES)


def create(fl_config) -> FLAlgorithm:
  """Builds the method named by ``fl_config.algorithm`` from its hyperparameters."""
  name = fl_config.algorithm
  if name not in _FACTORIES:
    raise ValueError(f"config.fl.algorithm={name!r} is unknown; choose one of {list(ALGORITHMS)}.")
  return _FACTORIES[name](fl_config)


__all__ = ["ALGORITHMS", "FLAlgorithm", "base", "create", "server_update"]
