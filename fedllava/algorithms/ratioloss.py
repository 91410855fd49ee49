"""Ratio Loss (Wang, Xu, Wang & Zhu, AAAI 2021, "Addressing Class Imbalance in Federated
Learning"): FedAvg whose clients minimise a class-weighted cross-entropy, the weights set every
round by the server's monitor of the classifier's per-class updates on a small labelled,
class-balanced auxiliary set.

Monitor (server, after aggregation, on the global model ``W``; classifier kernel ``K``, ``[D, C]``).
For every class c, a copy of ``W`` is trained on the auxiliary images of class c alone (the
authors' ``LocalUpdate``: ``monitor_steps`` steps of PyTorch-style SGD with momentum and weight
decay on the mean cross-entropy, every parameter trained, BN in training mode), and

  Delta_c = K_c - K                                                  [D, C]

(``monitor="gradient"``: ``Delta_c = -grad_K`` of class c's mean cross-entropy at ``W``, one
full-batch gradient, the first-order term without decay or momentum),
and, at every element (d, j) of ``K``: ``m = argmax_c Delta_c[d, j]``; the element belongs to
class m when m dominates, i.e. fewer than two classes p have ``|Delta_p| > 0.8 |Delta_m|``
(when ``Delta_m = 0``: fewer than two classes have ``Delta_p = 0``). With ``P_c`` the elements
that belong to class c,

  Ra_c = | sum_{P_c} Delta_c | / | sum_{P_c} mean_{p != c} Delta_p |   (10 if the denominator is 0)
  Ra_c <- min(Ra_c, 5000),        weight_c = alpha + beta * Ra_c.

A class the global model under-fits (a minority class) gets a large own update and small updates
from the other classes' images, hence a large ratio and weight.

Client loss (the weights reach every client as the round's ``message``; the first round's are
1, i.e. plain cross-entropy, as the authors' ``ratio = None`` before the first monitor):

  L = sum_i v_i weight_{y_i} CE(y_i, p_i) / max(sum_i v_i, 1)      (v: 1 real, 0 padding)

the per-example ``Loss(x, class) = -alpha log softmax(x)[class]`` of the docstring of the
authors' ``Ratio_Cross_Entropy``, as liul4's ``RatioLoss(size_average=True)`` computes it. Documented deviation: the authors' ``Ratio_Cross_Entropy``
(models/Update.py) indexes the 1-D weights ``alpha[ids]`` (shape ``[N]``) and multiplies them by
``log_p`` of shape ``[N, 1]``, which broadcasts to ``[N, N]``; its mean is the batch's mean weight
times its mean cross-entropy, one scalar weight per batch. We keep the per-example weight.

Conventions where the code and this framework differ (and why):
  * Delta_c: the default ``monitor="train"`` is the code's local training (momentum 0.9, weight
    decay 5e-4, ``local_ep`` = 2 epochs; a class's auxiliary images are one batch, so one step an
    epoch; the clients' learning rate). The earlier ``monitor="gradient"`` (one gradient, kept
    as an option) collapses on the digits default: for a class the model no longer predicts,
    the other classes' updates of its column vanish, Ra hits the cap and the weight 501
    (digits default, seed 7: top-1 18.7, weights up to 501; the training: 96.7, weights
    1.19-4.75; without weight decay: 95.8, up to 4.94; ONE step, no momentum, no decay: 95.5,
    up to 5.21). That one step's kernel change is ``-lr`` times the gradient at ``W``, so what
    separates it from ``"gradient"`` is BN: the code's ``net.train()`` normalises each class's
    batch by its own statistics, where ``"gradient"`` uses the running ones (eval mode), on
    which the other classes' images give a never-predicted class probability ~0.
  * ``monitor="gradient"`` uses the model's features in eval mode (BN running statistics).
  * The monitor runs on the aggregated model of this round and its weights are used by the next
    round's clients; the authors' monitor runs on the model this round's clients started from
    (one round older).
  * The auxiliary set: ``config.fl.ratioloss.aux_per_class`` images of every class held out of the
    training split before the long tail (never a client's, never the test set); the authors pick
    them from the training set (``ratio_loss_data``). Only the classifier kernel enters (the
    code: ``fc1.weight``), not its bias.

The paper's text could not be read here (only its abstract); formulas and defaults are the
authors' code's.

References:
  balanced-fl/Addressing-Class-Imbalance-FL, FEMNIST-4-Losses/models/Fed.py
  (``outlier_detect``/``search_neuron_new``: the dominance mask with threshold 0.8;
  ``whole_determination``: the ratio, 10 for a zero denominator, the cap 5000, ``1.0 + 0.1 *
  ratio``); main_nn.py (the monitor trains a copy of the global model on each class's auxiliary
  data; ``ratio = None`` in the first round); liul4/Federated_Learning Ratio_Loss/imbalanced/
  loss.py (``RatioLoss``: ``-alpha[y] log p_y``, mean over the batch).
"""

import math

import jax
import jax.numpy as jnp
import optax

from fedllava import errors, supervised
from fedllava.algorithms import base

DOMINANCE = 0.8  # search_neuron_new: np.abs(temp) / abs(max) > 0.80
ZERO_DENOMINATOR = 10.0  # whole_determination: res = 10 when aux_other_sum == 0
CAP = 5000.0  # whole_determination: "add a upper bound to the ratio"


def weighted_cross_entropy(logits, labels, class_weights, weights):
  """``sum_i v_i w_{y_i} CE_i / max(sum_i v_i, 1)``."""
  ce = supervised.cross_entropy(logits, labels)
  return base.masked_mean(class_weights[labels].astype(ce.dtype) * ce, weights)


def class_updates(features, labels, kernel, bias, num_classes: int):
  """``[C, D, C]``: ``Delta_c = -grad_K`` of class c's mean cross-entropy at ``(K, b)``."""

  def class_loss(k, c):
    mask = (labels == c).astype(features.dtype)
    ce = supervised.cross_entropy(features @ k + bias, labels)
    return jnp.sum(mask * ce) / jnp.maximum(jnp.sum(mask), 1.0)

  grads = jax.vmap(jax.grad(class_loss), in_axes=(None, 0))(kernel, jnp.arange(num_classes))
  return -grads


def monitor_ratios(deltas):
  """``Ra_c`` (capped) from the per-class updates ``deltas`` ``[C, ...]`` (the module docstring)."""
  c = deltas.shape[0]
  top = jnp.max(deltas, axis=0)
  owner = jnp.argmax(deltas, axis=0)  # the first maximum, as list.index(max(...))
  near = jnp.where(
    top == 0, deltas == 0, jnp.abs(deltas) > DOMINANCE * jnp.abs(jnp.where(top == 0, 1.0, top))
  )
  dominant = jnp.sum(near, axis=0) < 2
  pos = dominant[None] & (owner[None] == jnp.arange(c).reshape((c,) + (1,) * (deltas.ndim - 1)))
  pos = pos.astype(deltas.dtype)
  others = (jnp.sum(deltas, axis=0)[None] - deltas) / (c - 1)
  axes = tuple(range(1, deltas.ndim))
  own = jnp.sum(pos * deltas, axis=axes)
  other = jnp.sum(pos * others, axis=axes)
  safe = jnp.where(other == 0, 1.0, other)
  ratio = jnp.where(other == 0, ZERO_DENOMINATOR, jnp.abs(own) / jnp.abs(safe))
  return jnp.minimum(ratio, CAP)


MONITORS = ("train", "gradient")


def sgd(learning_rate: float, momentum: float, weight_decay: float):
  """PyTorch's ``SGD(lr, momentum, weight_decay)``: ``g + wd * w``, then heavy-ball momentum
  (first step: the buffer is the gradient), ``w -= lr * buffer``; every parameter decays."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.sgd(learning_rate, momentum=momentum if momentum > 0 else None),
  )


def class_batches(images, labels, num_classes: int):
  """The balanced labelled set as ``[C, k, ...]`` (class c's k images in row c), ``k = N / C``."""
  n = labels.shape[0]
  if n % num_classes:
    raise ValueError(f"ratioloss: {n} monitor images are not {num_classes} classes x k")
  order = jnp.argsort(labels, stable=True)
  k = n // num_classes
  return images[order].reshape((num_classes, k) + images.shape[1:])


def trained_updates(model_fn, variables, images, labels, num_classes: int, *, steps, tx):
  """``[C, D, C]``: ``Delta_c = K_c - K``, the classifier kernel's change after ``steps`` steps of
  ``tx`` on class c's images alone (one batch: all k of them, BN in training mode, every
  parameter trained, mean cross-entropy with label c), from the global model each time; the
  classes one after another (``lax.map``)."""
  batches = class_batches(images, labels, num_classes)
  kernel = variables["params"]["classifier"]["kernel"]

  def loss_fn(params, batch_stats, x, c):
    out, stats = model_fn({"params": params, "batch_stats": batch_stats}, x, train=True)
    y = jnp.full((x.shape[0],), c, jnp.int32)
    return jnp.mean(supervised.cross_entropy(out["logits"], y)), stats

  def one_class(args):
    x, c = args

    def step(carry, _):
      params, stats, opt = carry
      grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats, x, c)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), stats, opt), None

    init = (variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"]))
    (params, _, _), _ = jax.lax.scan(step, init, None, length=steps)
    return params["classifier"]["kernel"] - kernel

  return jax.lax.map(one_class, (batches, jnp.arange(num_classes)))


def create(
  alpha: float = 1.0,
  beta: float = 0.1,
  *,
  monitor: str = "train",
  monitor_steps: int = 2,
  monitor_lr: float = 0.05,
  monitor_momentum: float = 0.9,
  monitor_weight_decay: float = 5e-4,
) -> base.FLAlgorithm:
  if monitor not in MONITORS:
    raise ValueError(f"ratioloss: monitor={monitor!r}; choose one of {MONITORS}")
  tx = sgd(monitor_lr, monitor_momentum, monitor_weight_decay)

  def client_loss(outputs, labels, weights, message=None):
    if message is None:
      raise ValueError("ratioloss: the clients got no class weights (the round's message)")
    return weighted_cross_entropy(outputs["logits"], labels, message, weights)

  def server_init(variables, num_classes, key):
    del key
    dtype = variables["params"]["classifier"]["kernel"].dtype  # the master dtype
    return {"class_weights": jnp.ones((num_classes,), dtype)}

  def server_step(ctx: base.ServerContext, model_fn):
    if ctx.server_data is None:
      raise ValueError("ratioloss: the round got no labelled server images (server_inputs['data'])")
    clf = ctx.variables["params"]["classifier"]
    num_classes = clf["kernel"].shape[-1]
    images, labels = ctx.server_data["images"], ctx.server_data["labels"]
    if monitor == "train":
      deltas = trained_updates(
        model_fn, ctx.variables, images, labels, num_classes, steps=monitor_steps, tx=tx
      )
    else:
      feats = model_fn(ctx.variables, images)["features"].astype(clf["kernel"].dtype)
      deltas = class_updates(feats, labels, clf["kernel"], clf["bias"], num_classes)
    ratio = monitor_ratios(deltas.astype(clf["kernel"].dtype))
    w = (alpha + beta * ratio).astype(ctx.state["class_weights"].dtype)
    metrics = {
      "ratio_min": jnp.min(ratio),
      "ratio_max": jnp.max(ratio),
      "weight_min": jnp.min(w),
      "weight_max": jnp.max(w),
    }
    return ctx.variables, {"class_weights": w}, metrics

  def message(variables, state):
    del variables
    return state["class_weights"]

  return base.create(
    "ratioloss",
    client_loss=client_loss,
    server_init=server_init,
    server_step=server_step,
    message=message,
    server_data="labeled_balanced",
  )


def server_labeled_per_class(fl) -> tuple[int, str]:
  """The monitor's auxiliary set (``server_data="labeled_balanced"``): images per class the data
  build holds out with labels, and the field that sets it."""
  return int(fl.ratioloss.aux_per_class), "config.fl.ratioloss.aux_per_class"


def _monitor_lr(fl) -> float:
  """``config.fl.ratioloss.monitor_lr``, None = the clients' ``config.fl.learning_rate`` (the code's
  monitor is a ``LocalUpdate`` with the clients' ``args.lr``)."""
  lr = fl.ratioloss.monitor_lr
  return float(fl.learning_rate if lr is None else lr)


def from_config(fl) -> base.FLAlgorithm:
  r = fl.ratioloss
  return create(
    r.alpha,
    r.beta,
    monitor=r.monitor,
    monitor_steps=r.monitor_steps,
    monitor_lr=_monitor_lr(fl),
    monitor_momentum=r.monitor_momentum,
    monitor_weight_decay=r.monitor_weight_decay,
  )


def validate(fl) -> None:
  r = fl.ratioloss
  if not (r.alpha >= 0 and math.isfinite(r.alpha)):
    raise errors.ConfigError(f"config.fl.ratioloss.alpha={r.alpha} must be >= 0 (code: 1.0).")
  if not (r.beta >= 0 and math.isfinite(r.beta)):
    raise errors.ConfigError(f"config.fl.ratioloss.beta={r.beta} must be >= 0 (code: 0.1).")
  if r.alpha + r.beta <= 0:
    raise errors.ConfigError("config.fl.ratioloss.alpha + beta must be > 0 (code: 1.0, 0.1).")
  if not (isinstance(r.aux_per_class, int) and r.aux_per_class >= 1):
    raise errors.ConfigError(
      f"config.fl.ratioloss.aux_per_class={r.aux_per_class} must be an integer >= 1 (the "
      "monitor needs labelled images of every class; default 10)."
    )
  if r.monitor not in MONITORS:
    raise errors.ConfigError(
      f"config.fl.ratioloss.monitor={r.monitor!r}; choose one of {MONITORS} (code: 'train')."
    )
  if not (isinstance(r.monitor_steps, int) and r.monitor_steps >= 1):
    raise errors.ConfigError(
      f"config.fl.ratioloss.monitor_steps={r.monitor_steps} must be an integer >= 1 (code: 2)."
    )
  lr = _monitor_lr(fl)
  if not (lr > 0 and math.isfinite(lr)):
    raise errors.ConfigError(
      f"config.fl.ratioloss.monitor_lr={lr} must be > 0 (None: config.fl.learning_rate)."
    )
  if not 0 <= r.monitor_momentum < 1:
    raise errors.ConfigError(
      f"config.fl.ratioloss.monitor_momentum={r.monitor_momentum} must be in [0, 1) (code: 0.9)."
    )
  if not (r.monitor_weight_decay >= 0 and math.isfinite(r.monitor_weight_decay)):
    raise errors.ConfigError(
      f"config.fl.ratioloss.monitor_weight_decay={r.monitor_weight_decay} must be >= 0 (code: "
      "5e-4)."
    )
