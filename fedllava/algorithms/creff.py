"""CReFF (Shang et al., IJCAI 2022, "Federated Learning on Heterogeneous and Long-Tailed Data
via Classifier Re-training with Federated Features"), as the authors' code does it.

The server keeps ``num_features_per_class`` federated features per class, ``S_c`` (drawn once
from N(0, 1), kept across rounds), and a linear classifier ``theta`` (a fresh linear layer
before round 1, then the previous round's re-trained one), sent to every client (``message``).
Client k, with the received backbone in eval mode and ``theta`` as the last layer, computes for
each class c it holds the gradient of the mean cross-entropy over a random batch of
``min(grad_batch, N_c^k)`` of its class-c features, averaged over ``grad_repeats`` batches:

  g_c^k = 1/R sum_r grad_theta CE(theta; B_r),    uploaded with has_c^k = [N_c^k > 0].

The server averages a class's gradients with equal weight over the clients that hold it,
``g_c = sum_k has_c^k g_c^k / sum_k has_c^k`` (not by size), then moves the features by plain
SGD (``match_lr``, ``match_steps`` steps) on the gradient-matching loss

  L(S) = sum_{c: g_c exists} [ sum_j (1 - cos(dW_c[:, j], gW_c[:, j]))  + (1 - cos(db_c, gb_c)) ],
  cos(a, b) = <a, b> / (|a| |b| + 1e-6),   (dW_c, db_c) = grad_theta CE(theta; S_c),

(one cosine per output unit's weight row, one over the whole bias), and re-trains a fresh
linear layer on all the federated features (``retrain_lr``, ``retrain_epochs``, batch
``batch_size``, shuffled, last partial batch kept; ``classifier.retrain``). The re-trained
layer is evaluated (``eval_variables``) and is next round's ``theta``; the clients continue
from the FedAvg model.

With ``dsa`` (the code's ``--method DSA``, options.py:32-41, main.py:209-211) each batch's
normalised images are augmented by DSA (``fedllava/algorithms/dsa.py``: one strategy of
``dsa_strategy`` and one draw for the whole batch, fresh per class and repeat) before the
backbone computes that batch's features; without it the features of the un-augmented images
are computed once.

Deviations: the code hard-codes 10 classes and 256 features; we use the model's. Its DSA seed
is the wall clock (``int(time.time() * 1000) % 100000``); ours comes from the client's key.

Defaults (``config.fl.creff``) are the code's: options.py:16-22 (num_of_feature 100,
lr_feature 0.1, match_epoch 100, lr_net 0.01, crt_epoch 300, batch_real 32, batch 32) and
the 10 repeats of main.py:205; DSA on with options.py:33's strategy string.

References:
  shangxinyi/CReFF-FL main.py:40-44 (features, N(0, 1)), 51-95 (``update_feature_syn``:
  equal-weight averaging, SGD on the summed matching loss), 97-124 (``feature_re_train``),
  175-231 (``compute_gradient``), 293-325 (round order); Dataset/Gradient_matching_loss.py:39-56
  (``distance_wb``).
"""

import math

import jax
import jax.numpy as jnp
import optax

from fedllava import errors
from fedllava.algorithms import base, classifier
from fedllava.algorithms import dsa as dsa_lib

EPS = 1e-6  # Gradient_matching_loss.py:54


def class_gradient(clf: dict, features, label, mask):
  """``grad_theta`` of the mean cross-entropy of ``features`` (``mask``ed) all labelled
  ``label``, for a linear layer ``theta = clf``."""

  def loss(p):
    ce = optax.softmax_cross_entropy_with_integer_labels(
      classifier.logits(p, features), jnp.full(features.shape[:1], label)
    )
    return jnp.sum(mask * ce) / jnp.maximum(jnp.sum(mask), 1.0)

  return jax.grad(loss)(clf)


def client_gradients(
  features, labels, valid, clf: dict, key, *, batch: int, repeats: int, batch_features=None
):
  """One client's per-class classifier gradients ``{"kernel": [C, F, C], "bias": [C, C]}`` and
  ``has_class [C]``: for each class, ``repeats`` batches of ``min(batch, N_c)`` distinct
  examples of that class (uniform without replacement), their gradients averaged.

  ``features [N, F]`` are the examples' features; or ``features=None`` and
  ``batch_features(indices [b], key) -> [b, F]`` computes each batch's features afresh (DSA),
  one batch after another (``lax.map``, so one batch of images is in the model at a time)."""
  n = labels.shape[0]
  num_classes = clf["kernel"].shape[1]
  b = min(batch, n)
  dtype = clf["kernel"].dtype if features is None else features.dtype

  def one(c, k):
    member = (labels == c) & (valid > 0)
    order = jnp.argsort(jnp.where(member, jax.random.uniform(k, (n,)), 2.0))[:b]
    mask = (jnp.arange(b) < jnp.sum(member)).astype(dtype)
    if features is None:
      return class_gradient(clf, batch_features(order, jax.random.fold_in(k, 1)), c, mask)
    return class_gradient(clf, features[order], c, mask)

  keys = jax.random.split(key, num_classes * repeats)
  if features is None:
    classes = jnp.repeat(jnp.arange(num_classes), repeats)
    flat = jax.lax.map(lambda a: one(*a), (classes, keys))
    per_class = jax.tree.map(lambda g: g.reshape((num_classes, repeats) + g.shape[1:]), flat)
  else:
    keys = keys.reshape((num_classes, repeats) + keys.shape[1:])
    per_class = jax.vmap(lambda c, ks: jax.vmap(lambda k: one(c, k))(ks))(
      jnp.arange(num_classes), keys
    )
  grads = jax.tree.map(lambda g: jnp.mean(g, axis=1), per_class)
  member = jax.nn.one_hot(labels, num_classes, dtype=dtype) * valid[:, None].astype(dtype)
  has = (jnp.sum(member, axis=0) > 0).astype(dtype)
  return {"kernel": grads["kernel"], "bias": grads["bias"], "has_class": has}


def aggregate(gradients: dict):
  """Per class, the equal-weight mean over the clients that hold it; ``(targets, has [C])``."""
  has = gradients["has_class"]  # [M, C]
  count = jnp.sum(has, axis=0)
  mean = lambda g: (
    jnp.einsum("mc,mc...->c...", has, g)
    / jnp.maximum(  # noqa: E731
      count, 1.0
    ).reshape((-1,) + (1,) * (g.ndim - 2))
  )
  targets = {"kernel": mean(gradients["kernel"]), "bias": mean(gradients["bias"])}
  return targets, (count > 0).astype(has.dtype)


def _one_minus_cos(a, b, axis=None):
  dot = jnp.sum(a * b, axis=axis)
  return 1.0 - dot / (jnp.linalg.norm(a, axis=axis) * jnp.linalg.norm(b, axis=axis) + EPS)


def distance(syn: dict, real: dict):
  """``sum_j (1 - cos)`` over the output units' weight rows (our kernel's columns) plus one
  ``1 - cos`` over the whole bias (``distance_wb``)."""
  return jnp.sum(_one_minus_cos(syn["kernel"], real["kernel"], axis=0)) + _one_minus_cos(
    syn["bias"], real["bias"]
  )


def matching_loss(features, clf: dict, targets: dict, has):
  """``sum_c has_c * distance(grad_theta CE(theta; S_c), g_c)``; ``features`` ``[C, n, F]``."""
  num_classes, n, _ = features.shape
  ones = jnp.ones((n,), features.dtype)

  def per_class(c, feats, target):
    return distance(class_gradient(clf, feats, c, ones), target)

  d = jax.vmap(per_class)(jnp.arange(num_classes), features, targets)
  return jnp.sum(has * d)


def match_features(features, clf: dict, targets: dict, has, *, learning_rate: float, steps: int):
  """``steps`` plain SGD steps on ``matching_loss``; returns ``(features, last loss)``."""

  def step(s, _):
    loss, g = jax.value_and_grad(matching_loss)(s, clf, targets, has)
    return s - learning_rate * g, loss

  features, losses = jax.lax.scan(step, features, None, length=steps)
  return features, losses[-1]


def create(
  num_features_per_class: int = 100,
  match_lr: float = 0.1,
  match_steps: int = 100,
  retrain_lr: float = 0.01,
  retrain_epochs: int = 300,
  batch_size: int = 32,
  grad_batch: int = 32,
  grad_repeats: int = 10,
  dsa: bool = True,
  dsa_strategy: str = dsa_lib.STRATEGY,
  matcher=None,
) -> base.FLAlgorithm:
  """CReFF; ``matcher(features, classifier, targets, has, ctx) -> (features, loss)`` replaces
  the feature update (default ``match_features``; CLIP2FL adds a term). ``dsa``: DSA of the
  client gradients' images (``dsa_strategy``)."""
  dsa_lib.parse(dsa_strategy)
  if matcher is None:

    def matcher(feats, clf, targets, has, ctx):
      del ctx
      return match_features(feats, clf, targets, has, learning_rate=match_lr, steps=match_steps)

  def message(variables, state):
    del variables
    return state["classifier"]

  def client_upload(model_fn, global_variables, local_variables, data, message):
    del local_variables
    if dsa:
      images = data.images

      def batch_features(order, key):
        aug = lambda x: dsa_lib.augment(x, key, dsa_strategy)  # noqa: E731
        return model_fn(global_variables, images[order], transform=aug)["features"]

      shape = jax.eval_shape(lambda: model_fn(global_variables, images[:1]))["features"]
      clf = jax.tree.map(lambda x: x.astype(shape.dtype), message)
      grads = client_gradients(
        None, data.labels, data.valid, clf, data.key, batch=grad_batch, repeats=grad_repeats,
        batch_features=batch_features,
      )  # fmt: skip
      return {"gradients": grads}
    feats = model_fn(global_variables, data.images)["features"]
    clf = jax.tree.map(lambda x: x.astype(feats.dtype), message)
    grads = client_gradients(
      feats, data.labels, data.valid, clf, data.key, batch=grad_batch, repeats=grad_repeats
    )
    return {"gradients": grads}

  def server_init(variables, num_classes, key):
    kernel = variables["params"]["classifier"]["kernel"]
    dim, dtype = kernel.shape[0], kernel.dtype
    k_feat, k_clf = jax.random.split(key)
    feats = jax.random.normal(k_feat, (num_classes, num_features_per_class, dim), dtype)
    return {
      "features": feats,
      "classifier": classifier.fresh_classifier(k_clf, dim, num_classes, dtype),
    }

  def server_step(ctx: base.ServerContext, model_fn):
    del model_fn
    state = ctx.state
    feats = state["features"]
    grads = jax.tree.map(lambda x: x.astype(feats.dtype), ctx.uploads["gradients"])
    targets, has = aggregate(grads)
    feats, match_loss = matcher(feats, state["classifier"], targets, has, ctx)
    num_classes, n, dim = feats.shape
    k_init, k_shuffle = jax.random.split(ctx.key)
    fresh = classifier.fresh_classifier(k_init, dim, num_classes, feats.dtype)
    clf, loss = classifier.retrain(
      fresh,
      feats.reshape(-1, dim),
      jnp.repeat(jnp.arange(num_classes), n),
      k_shuffle,
      learning_rate=retrain_lr,
      epochs=retrain_epochs,
      batch_size=batch_size,
    )
    metrics = {"match_loss": match_loss, "retrain_loss": loss}
    return ctx.variables, {"features": feats, "classifier": clf}, metrics

  def eval_variables(variables, state):
    return classifier.with_classifier(variables, state["classifier"])

  return base.create(
    "creff",
    client_upload=client_upload,
    server_init=server_init,
    server_step=server_step,
    message=message,
    eval_variables=eval_variables,
  )


INT_FIELDS = (
  "num_features_per_class",
  "match_steps",
  "retrain_epochs",
  "batch_size",
  "grad_batch",
  "grad_repeats",
)


def from_config(fl) -> base.FLAlgorithm:
  c = fl.creff
  return create(
    c.num_features_per_class,
    c.match_lr,
    c.match_steps,
    c.retrain_lr,
    c.retrain_epochs,
    c.batch_size,
    c.grad_batch,
    c.grad_repeats,
    c.dsa,
    c.dsa_strategy,
  )


def validate(fl) -> None:
  c = fl.creff
  for field in INT_FIELDS:
    if not (isinstance(c[field], int) and c[field] >= 1):
      raise errors.ConfigError(f"config.fl.creff.{field}={c[field]} must be an integer >= 1.")
  for field in ("match_lr", "retrain_lr"):
    if not (c[field] > 0 and math.isfinite(c[field])):
      raise errors.ConfigError(f"config.fl.creff.{field}={c[field]} must be a finite number > 0.")
  if not isinstance(c.dsa, bool):
    raise errors.ConfigError(f"config.fl.creff.dsa={c.dsa!r} must be True or False.")
  try:
    dsa_lib.parse(c.dsa_strategy if isinstance(c.dsa_strategy, str) else "")
  except ValueError as e:
    raise errors.ConfigError(f"config.fl.creff.dsa_strategy: {e}") from None
