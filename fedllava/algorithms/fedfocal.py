"""Fed-Focal Loss (Sarkar et al. 2020): FedAvg whose clients minimise the focal loss.

Focal loss (Lin et al. 2017, Eq. 5), multi-class:  FL(p_t) = -alpha (1 - p_t)^gamma log p_t,
with p_t the softmax probability of the true class; gamma = 0 and alpha = 1 is cross-entropy.
Conventions (the paper publishes no code): ``alpha`` is one scalar for every class (a
per-class alpha would be a re-weighting method of its own), and the loss of a batch is the mean
over its real examples (``base.masked_mean``), as FedAvg's cross-entropy. Defaults
(``config.fl.fedfocal``): gamma = 2, the value Lin et al. and Sarkar et al. use; alpha = 1.
"""

import math

import jax
import jax.numpy as jnp

from fedllava import errors
from fedllava.algorithms import base


def focal_loss(logits, labels, gamma: float, alpha: float = 1.0):
  """Per-example ``-alpha (1 - p_t)^gamma log p_t``."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  logp_t = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  return -alpha * (1.0 - jnp.exp(logp_t)) ** gamma * logp_t


def create(gamma: float = 2.0, alpha: float = 1.0) -> base.FLAlgorithm:
  def client_loss(outputs, labels, weights, message=None):
    del message
    return base.masked_mean(focal_loss(outputs["logits"], labels, gamma, alpha), weights)

  return base.create("fedfocal", client_loss=client_loss)


def from_config(fl) -> base.FLAlgorithm:
  return create(fl.fedfocal.gamma, fl.fedfocal.alpha)


def validate(fl) -> None:
  f = fl.fedfocal
  if not (f.gamma >= 0 and math.isfinite(f.gamma)):
    raise errors.ConfigError(f"config.fl.fedfocal.gamma={f.gamma} must be >= 0 (paper: 2).")
  if not (f.alpha > 0 and math.isfinite(f.alpha)):
    raise errors.ConfigError(f"config.fl.fedfocal.alpha={f.alpha} must be > 0.")
