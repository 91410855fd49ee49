"""FedAvg + tau-norm (Kang et al. 2020, "Decoupling Representation and Classifier", Sec. 4).

Training is FedAvg's. The evaluated model normalises every class's classifier weights:
``w_i <- w_i / ||w_i||^tau`` (``w_i`` the weights of class ``i``: a column of our ``[F, C]``
kernel); the clients keep training the plain FedAvg model. As in the authors' code
(facebookresearch/classifier-balancing, ``pnorm`` of the tau-normalised classifier), the bias is
dropped from the logits (``keep_bias=False``); ``keep_bias=True`` keeps it untouched (tau never
applies to it). Default tau = 1.0 (``config.fl.taunorm.tau``; the authors pick it on a grid
0..2 step 0.1 on validation data, which the FL protocol has no split for).
"""

import math

import jax.numpy as jnp

from fedllava import errors
from fedllava.algorithms import base


def normalise(classifier: dict, tau: float, keep_bias: bool) -> dict:
  """``{"kernel": W / ||W_:,i||^tau, "bias": b or 0}`` of a Dense classifier ``[F, C]``."""
  kernel = classifier["kernel"]
  norms = jnp.linalg.norm(kernel, axis=0, keepdims=True)
  out = {"kernel": kernel / jnp.power(norms, tau)}
  out["bias"] = classifier["bias"] if keep_bias else jnp.zeros_like(classifier["bias"])
  return out


def create(tau: float = 1.0, keep_bias: bool = False) -> base.FLAlgorithm:
  def eval_variables(variables, state):
    del state
    params = dict(variables["params"])
    params["classifier"] = normalise(params["classifier"], tau, keep_bias)
    return {**variables, "params": params}

  return base.create("taunorm", eval_variables=eval_variables)


def from_config(fl) -> base.FLAlgorithm:
  return create(fl.taunorm.tau, fl.taunorm.keep_bias)


def validate(fl) -> None:
  if not (fl.taunorm.tau >= 0 and math.isfinite(fl.taunorm.tau)):
    raise errors.ConfigError(f"config.fl.taunorm.tau={fl.taunorm.tau} must be >= 0.")
