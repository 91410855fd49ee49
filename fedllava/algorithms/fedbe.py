"""FedBE (Chen & Chao, ICLR 2021, "FedBE: Making Bayesian Model Ensemble Applicable to FL").

After FedAvg's aggregation the server fits a diagonal Gaussian over the round's client models,
samples ``S`` models from it, and distills the Bayesian model ensemble into the global model:

  mu      = sum_k p_k w_k                      (the FedAvg model, p_k = |D_k| / sum |D_k|)
  sigma^2 = sum_k p_k (w_k - mu)^2             (element-wise, the same weights; Sec. 4.2)
  w_s     = mu + var_scale * sigma * eps_s,    eps_s ~ N(0, I),  s = 1..S
  p(x)    = mean over M = {w_1..w_S} + {real clients} + {mu} of softmax(f(x; w))
  w       <- SGD + SWA on 1/B sum_b KL(p(x_b) || softmax(f(x_b; w)))   starting from mu

The distilled (SWA-averaged) model is what the clients receive next round and what is
evaluated. Padding clients (weight 0) count neither in the Gaussian nor in the ensemble. The
sampled models are parameters only; they keep the FedAvg model's BN running statistics.

Defaults (``config.fl.fedbe``), from the authors' code (utils/options.py, models/Update.py):
S = 10 (``--num_sample_teacher``), 20 passes over the server data (``--server_ep``), batch 128
(``--server_bs``), SGD lr 1e-3, momentum 0.9, weight decay 1e-5, SWA from step 500 every 25
steps (``set_opt``); the number of steps is ``epochs * ceil(N_pool / batch)``. Documented
deviations: the code's Gaussian is fitted over per-layer *normalised* updates
``(w_k - w_g) / ||w_k - w_g||`` with unit weights, scaled by ``--var_scale 0.1`` and rescaled by
the mean norm (swag.py ``SWAG_server``); we use the paper's size-weighted Gaussian over the
models with ``var_scale = 1`` (a field). The code sharpens the averaged probabilities with
``temp_sharpen(p, 0.5)`` and averages KL over classes too (``.mean()``); we use the paper's
plain average and the batch-mean KL. The code recomputes BN statistics on the server data after
the SWA swap (``bn_update``); we average the BN running statistics with the parameters.
Server data: as FedDF's (``config.fl.fedbe.server_data``, the long tail's left-out training
images, without labels; the paper uses held-out CIFAR training images, the same idea).

References:
  hongyouc/FedBE, swag.py (``SWAG_server.construct_models``, mode "gaussian"); utils/options.py
    (``--num_sample_teacher 10``, ``--server_ep 20``, ``--server_bs 128``, ``--var_scale 0.1``);
    models/Update.py (``ServerUpdate.set_opt``, ``ServerUpdate.train``, ``loss_wrapper``);
    utils/tools.py (``get_input_logits``: teachers in eval mode, softmax; ``merge_logits``).
"""

import math

import jax
import jax.numpy as jnp
import optax

from fedllava import errors
from fedllava.algorithms import base, distill

SERVER_DATA = ("unlabeled",)


def gaussian(client_params, weights):
  """``(mu, sigma^2)``: the ``weights``-weighted mean and element-wise variance of the stacked
  client parameters (weights sum to one; padding clients weigh 0)."""
  mu = base.weighted_mean(client_params, weights)
  dev = jax.tree.map(lambda x, m: jnp.square(x - m[None]), client_params, mu)
  return mu, base.weighted_mean(dev, weights)


def sample_models(mean_variables, var, key, num_samples: int, var_scale: float):
  """``num_samples`` models ``mu + var_scale * sqrt(var) * eps`` stacked on a leading axis; each
  keeps ``mean_variables``' BN statistics. Leaf ``i`` uses ``fold_in(fold_in(key, s), i)``."""
  params = mean_variables["params"]
  leaves, treedef = jax.tree.flatten(params)
  var_leaves = treedef.flatten_up_to(var)

  def one(s):
    k = jax.random.fold_in(key, s)
    out = [
      m + var_scale * jnp.sqrt(v) * jax.random.normal(jax.random.fold_in(k, i), m.shape, m.dtype)
      for i, (m, v) in enumerate(zip(leaves, var_leaves))
    ]
    return jax.tree.unflatten(treedef, out)

  sampled = jax.vmap(one)(jnp.arange(num_samples))
  stats = jax.tree.map(
    lambda x: jnp.broadcast_to(x, (num_samples,) + x.shape), mean_variables["batch_stats"]
  )
  return {"params": sampled, "batch_stats": stats}


def ensemble_probabilities(model_fn, mean_variables, client_variables, weights, sampled, images):
  """The mean softmax over the sampled models, the real clients and the mean model."""
  real = (weights > 0).astype(jnp.result_type(weights, jnp.float32))
  num_samples = jax.tree.leaves(sampled)[0].shape[0]
  count = num_samples + jnp.sum(real) + 1.0
  probs = distill.pool_probabilities(model_fn, sampled, images, jnp.ones(num_samples) / count)
  probs = probs + distill.pool_probabilities(model_fn, client_variables, images, real / count)
  mean_logits = model_fn(mean_variables, images)["logits"].astype(probs.dtype)
  return probs + jax.nn.softmax(mean_logits, axis=-1) / count


def create(
  num_samples: int = 10,
  epochs: int = 20,
  batch_size: int = 128,
  learning_rate: float = 1e-3,
  momentum: float = 0.9,
  weight_decay: float = 1e-5,
  swa_start: int = 500,
  swa_every: int = 25,
  var_scale: float = 1.0,
  server_data: str = "unlabeled",
) -> base.FLAlgorithm:
  tx = optax.chain(  # PyTorch SGD: grad + wd * w, then heavy-ball momentum
    optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum)
  )

  def server_step(ctx: base.ServerContext, model_fn):
    if ctx.server_data is None:
      raise ValueError("fedbe: the round got no server images (server_inputs['data'])")
    mean = ctx.variables  # the FedAvg model: sum_k p_k w_k
    _, var = gaussian(ctx.client_variables["params"], ctx.weights)
    sample_key, distill_key = jax.random.split(ctx.key)
    sampled = sample_models(mean, var, sample_key, num_samples, var_scale)
    targets = ensemble_probabilities(
      model_fn, mean, ctx.client_variables, ctx.weights, sampled, ctx.server_data
    )
    n = ctx.server_data.shape[0]
    variables, loss = distill.distill(
      model_fn,
      mean,
      ctx.server_data,
      targets,
      distill_key,
      steps=epochs * -(-n // batch_size),
      batch_size=batch_size,
      tx=tx,
      swa_start=swa_start,
      swa_every=swa_every,
    )
    return variables, ctx.state, {"distill_loss": loss}

  return base.create("fedbe", server_step=server_step, server_data=server_data)


def from_config(fl) -> base.FLAlgorithm:
  f = fl.fedbe
  return create(
    f.num_samples, f.epochs, f.batch_size, f.learning_rate, f.momentum, f.weight_decay,
    f.swa_start, f.swa_every, f.var_scale, f.server_data,
  )  # fmt: skip


def validate(fl) -> None:
  f = fl.fedbe
  for field in ("num_samples", "epochs", "batch_size"):
    if f[field] < 1:
      raise errors.ConfigError(f"config.fl.fedbe.{field}={f[field]} must be >= 1.")
  if f.swa_start < 0 or f.swa_every < 0:
    raise errors.ConfigError(
      "config.fl.fedbe.swa_start and swa_every must be >= 0 (swa_every=0 turns SWA off)."
    )
  if not (f.learning_rate > 0 and math.isfinite(f.learning_rate)):
    raise errors.ConfigError(f"config.fl.fedbe.learning_rate={f.learning_rate} must be > 0.")
  for field in ("momentum", "weight_decay", "var_scale"):
    if not (f[field] >= 0 and math.isfinite(f[field])):
      raise errors.ConfigError(f"config.fl.fedbe.{field}={f[field]} must be a finite number >= 0.")
  if f.server_data not in SERVER_DATA:
    raise errors.ConfigError(
      f"config.fl.fedbe.server_data={f.server_data!r}; choose one of {SERVER_DATA} (the "
      "training images the long tail leaves out, without labels)."
    )
