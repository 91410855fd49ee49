"""FL methods, one module each; ``create`` picks one by ``config.fl.algorithm``.

Adding a method: write ``fedllava/algorithms/<name>.py`` with ``from_config(fl_config)``
returning a ``base.FLAlgorithm`` (built with ``base.create``: every part you leave out is
FedAvg's) and, if it has hyperparameters, ``validate(fl_config)`` for its section
``config.fl.<name>`` (in ``configs/common.py``); then add one line to ``METHODS``.
``config.fl.dp.enabled`` wraps the method's aggregation in client-level DP (``privacy.py``).
"""

from fedllava import errors
from fedllava.algorithms import (
  base,
  ccvr,
  clip2fl,
  creff,
  fedadam,
  fedavg,
  fedavgm,
  fedbe,
  feddf,
  fedfocal,
  fednova,
  fedprox,
  ratioloss,
  taunorm,
)
from fedllava.algorithms.base import FLAlgorithm, server_update

METHODS = {
  "fedavg": fedavg,
  "fedprox": fedprox,
  "fedavgm": fedavgm,
  "fednova": fednova,
  "fedadam": fedadam,
  "fedyogi": fedadam,
  "fedfocal": fedfocal,
  "taunorm": taunorm,
  "feddf": feddf,
  "fedbe": fedbe,
  "ccvr": ccvr,
  "creff": creff,
  "ratioloss": ratioloss,
  "clip2fl": clip2fl,
}
ALGORITHMS = tuple(METHODS)


def config_sections(name: str) -> tuple[str, ...]:
  """The ``config.fl.<section>`` blocks method ``name`` reads: its module's ``CONFIG_SECTIONS``,
  by default the module's own name (``fedyogi`` is the ``fedadam`` module: ``fl.fedadam``)."""
  module = METHODS[name]
  return tuple(getattr(module, "CONFIG_SECTIONS", (module.__name__.rsplit(".", 1)[-1],)))


def method_sections() -> frozenset:
  """Every ``config.fl.<section>`` block that belongs to some method."""
  return frozenset(s for name in METHODS for s in config_sections(name))


def create(fl_config) -> FLAlgorithm:
  """Builds the method named by ``fl_config.algorithm`` from its hyperparameters."""
  name = fl_config.algorithm
  if name not in METHODS:
    raise errors.ConfigError(
      f"config.fl.algorithm={name!r} is unknown; choose one of {list(ALGORITHMS)}."
    )
  module = METHODS[name]
  if hasattr(module, "validate"):
    module.validate(fl_config)
  from fedllava import privacy  # privacy imports this package's base

  return privacy.apply(module.from_config(fl_config), fl_config)


__all__ = [
  "ALGORITHMS",
  "METHODS",
  "config_sections",
  "method_sections",
  "FLAlgorithm",
  "base",
  "create",
  "server_update",
]
