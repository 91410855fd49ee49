"""FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2).

The server treats FedAvg's pseudo-gradient ``Delta_t = w_t - sum_k p_k w_k`` as a gradient and
applies Adam (or Yogi) to it:

  m_t = b1 m_{t-1} + (1 - b1) Delta_t
  v_t = b2 v_{t-1} + (1 - b2) Delta_t^2            (Yogi: v_t = v_{t-1} - (1 - b2) Delta_t^2
                                                     sign(v_{t-1} - Delta_t^2))
  w_{t+1} = w_t - eta m_t / (sqrt(v_t) + tau)

with optax's ``adam`` / ``yogi`` (their bias correction, as the authors' TensorFlow code uses
Keras' Adam). Defaults (``config.fl.fedadam``): eta = 0.01, b1 = 0.9, b2 = 0.99, tau = 1e-3,
the paper's Sec. 5 / App. D settings (b1, b2, tau fixed; eta from their CIFAR-10 grid).
Clients run plain local SGD as in FedAvg.
"""

import math

import optax

from fedllava import errors
from fedllava.algorithms import base


def create(learning_rate=0.01, b1=0.9, b2=0.99, tau=1e-3, yogi=False) -> base.FLAlgorithm:
  """FedAdam (``yogi=False``) or FedYogi with server step size ``learning_rate``."""
  if yogi:
    return base.create("fedyogi", server_optimizer=optax.yogi(learning_rate, b1, b2, tau))
  return base.create("fedadam", server_optimizer=optax.adam(learning_rate, b1, b2, tau))


def from_config(fl) -> base.FLAlgorithm:
  a = fl.fedadam
  return create(a.learning_rate, a.b1, a.b2, a.tau, yogi=fl.algorithm == "fedyogi")


def validate(fl) -> None:
  a = fl.fedadam
  if not (a.learning_rate > 0 and math.isfinite(a.learning_rate)):
    raise errors.ConfigError(f"config.fl.fedadam.learning_rate={a.learning_rate} must be > 0.")
  for field in ("b1", "b2"):
    if not 0 <= a[field] < 1:
      raise errors.ConfigError(f"config.fl.fedadam.{field}={a[field]} must be in [0, 1).")
  if not a.tau > 0:
    raise errors.ConfigError(f"config.fl.fedadam.tau={a.tau} must be > 0 (Reddi et al.: 1e-3).")
