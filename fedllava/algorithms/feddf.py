"""FedDF (Lin et al., NeurIPS 2020, "Ensemble Distillation for Robust Model Fusion in FL", Alg. 1).

After FedAvg's aggregation the server distills the ensemble of the round's client models into
the aggregated model on unlabeled server images:

  teacher:  p(x) = softmax( (1/|S_t|) sum_{k in S_t} f(x; w_k) / T )      (average of LOGITS)
  student:  w <- w - Adam step of  1/B sum_b KL(p(x_b) || softmax(f(x_b; w) / T))

starting from the FedAvg model ``w = sum_k |D_k|/|D| w_k``; the distilled model is what the
clients receive next round (FedDF's own design) and what is evaluated. ``S_t`` is the round's
real clients, each with weight ``1/|S_t|`` (Alg. 1; the code's default ``weights = 1/len``):
padding clients (FedAvg weight 0) are left out. The authors' CIFAR runs use
``update_student_scheme=avg_logits`` (averaged logits; ``avg_probs`` is their alternative).

Defaults (``config.fl.feddf``), from the authors' code: Adam lr 1e-3 with cosine annealing
over the distillation steps, gradient clipping at global norm 5, batch 128, T = 1. The code
runs up to 10^4 steps and stops early when accuracy on a *validation* split has not improved
for 1000 batches; the FL protocol here has no validation split, so ``steps`` is a fixed budget
(default 1000: the patience of the authors' early stopping, the shortest run their rule
allows). BN: the student in training mode (batch statistics, running statistics move), the
teachers in eval mode, as the code's ``prepare_model``. No augmentation of the server images.

Server data (``config.fl.feddf.server_data = "unlabeled"``): the paper distills on other data
(CIFAR-100 or downsampled ImageNet for CIFAR-10); here, by default, the training images the
long tail leaves out (``FederatedData.unlabeled``: held by no client, never the test set),
without labels: the same image distribution, no extra download, nothing a client holds.

References:
  epfml/federated-learning-public-code, codes/FedDF-code/README.md (the CIFAR-10 ResNet-8
    FedDF command: ``update_student_scheme=avg_logits, total_n_server_pseudo_batches=10000,
    early_stopping_server_batches=1000``); pcode/aggregation/noise_knowledge_transfer.py
    (``aggregate``: ``batch_size=128``, ``student_learning_rate=1e-3``, ``KL_temperature=1``;
    ``NoiseKTSolver.__init__``: ``optim.Adam`` + ``CosineAnnealingLR``;
    ``NoiseKTSolver.update_student``: ``avg_logits``, ``clip_grad_norm_(..., 5)``).
"""

import math

import jax
import jax.numpy as jnp
import optax

from fedllava import errors
from fedllava.algorithms import base, distill

SERVER_DATA = ("unlabeled",)


def teacher_probabilities(model_fn, client_variables, weights, images, temperature):
  """``softmax(mean over real clients of their logits / T)`` on ``images``; padding clients
  (``weights == 0``) take no part, every real client weighs ``1 / |S_t|``."""
  real = (weights > 0).astype(jnp.result_type(weights, jnp.float32))
  coef = real / jnp.maximum(jnp.sum(real), 1.0)
  logits = distill.pool_outputs(model_fn, client_variables, images, coef)
  return jax.nn.softmax(logits / temperature, axis=-1)


def create(
  steps: int = 1000,
  batch_size: int = 128,
  learning_rate: float = 1e-3,
  temperature: float = 1.0,
  clip_norm: float = 5.0,
  server_data: str = "unlabeled",
) -> base.FLAlgorithm:
  tx = optax.chain(
    optax.clip_by_global_norm(clip_norm),
    optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1))),
  )

  def server_step(ctx: base.ServerContext, model_fn):
    if ctx.server_data is None:
      raise ValueError("feddf: the round got no server images (server_inputs['data'])")
    targets = teacher_probabilities(
      model_fn, ctx.client_variables, ctx.weights, ctx.server_data, temperature
    )
    variables, loss = distill.distill(
      model_fn,
      ctx.variables,
      ctx.server_data,
      targets,
      ctx.key,
      steps=steps,
      batch_size=batch_size,
      tx=tx,
      temperature=temperature,
    )
    return variables, ctx.state, {"distill_loss": loss}

  return base.create("feddf", server_step=server_step, server_data=server_data)


def from_config(fl) -> base.FLAlgorithm:
  f = fl.feddf
  return create(f.steps, f.batch_size, f.learning_rate, f.temperature, f.clip_norm, f.server_data)


def validate(fl) -> None:
  f = fl.feddf
  for field in ("steps", "batch_size"):
    if f[field] < 1:
      raise errors.ConfigError(f"config.fl.feddf.{field}={f[field]} must be >= 1.")
  for field in ("learning_rate", "temperature", "clip_norm"):
    if not (f[field] > 0 and math.isfinite(f[field])):
      raise errors.ConfigError(f"config.fl.feddf.{field}={f[field]} must be a finite number > 0.")
  if f.server_data not in SERVER_DATA:
    raise errors.ConfigError(
      f"config.fl.feddf.server_data={f.server_data!r}; choose one of {SERVER_DATA} (the "
      "training images the long tail leaves out, without labels)."
    )
