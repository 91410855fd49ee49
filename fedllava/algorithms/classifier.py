"""Classifier re-training on feature vectors: the one loop CCVR and CReFF share.

Both methods re-train the model's last linear layer on the server, on feature vectors with
labels (CCVR: virtual features sampled from the pooled class Gaussians; CReFF: its federated
features), with plain SGD over shuffled epochs of fixed-size batches, as a PyTorch
``DataLoader(shuffle=True)`` without ``drop_last`` does. Inside jit the shapes stay static: each
epoch orders the valid examples by a fresh random key (a uniform permutation of them; the
invalid ones go last), slices ``ceil(N / B)`` batches of ``B``, and masks the examples past the
valid count, so the last partial batch is a full SGD step on its ``m < B`` examples (mean loss
over those ``m``) and a batch with no valid example changes nothing:

  for each epoch e, for each batch b:  W <- W - lr * grad_W mean_{i in b} CE(x_i W + c, y_i)

References:
  CReFF-FL (shangxinyi) main.py:97-116 (``feature_re_train``: fresh ``nn.Linear``, SGD, epochs
  of a shuffled ``DataLoader``); FL-bench (KarhouTam) src/server/ccvr.py ``calibrate_classifier``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedllava.models.resnet import torch_linear_init

PyTree = Any


def fresh_classifier(key, feature_dim: int, num_classes: int, dtype=jnp.float32) -> dict:
  """A new linear layer ``{"kernel": [F, C], "bias": [C]}`` with PyTorch's Linear init,
  U(-1/sqrt(F), 1/sqrt(F)) for kernel and bias (as the model's own ``classifier``)."""
  kk, kb = jax.random.split(key)
  init = torch_linear_init(feature_dim)
  return {
    "kernel": init(kk, (feature_dim, num_classes), dtype),
    "bias": init(kb, (num_classes,), dtype),
  }


def logits(classifier: dict, features: jax.Array) -> jax.Array:
  """``features @ kernel + bias``."""
  return features @ classifier["kernel"] + classifier["bias"]


def with_classifier(variables: PyTree, classifier: dict) -> PyTree:
  """``variables`` with ``params["classifier"]`` replaced (the model that is evaluated)."""
  params = dict(variables["params"])
  params["classifier"] = classifier
  return {**variables, "params": params}


def retrain(
  classifier: dict,
  features: jax.Array,
  labels: jax.Array,
  key,
  *,
  learning_rate: float,
  epochs: int,
  batch_size: int,
  valid: jax.Array | None = None,
) -> tuple[dict, jax.Array]:
  """Trains ``classifier`` on ``(features, labels)`` with plain SGD; jit-able, static shapes.

  Args:
    classifier: the start, ``{"kernel": [F, C], "bias": [C]}`` (``fresh_classifier`` for a new
      layer, the global model's classifier to continue it).
    features: ``[N, F]``.
    labels: int ``[N]``.
    key: the shuffling key (epoch ``e`` uses ``fold_in(key, e)``).
    learning_rate, epochs, batch_size: SGD step size, passes over the data, batch size ``B``.
    valid: ``[N]`` 1 for the examples to train on, 0 for padding (default: all).
  Returns:
    ``(classifier, mean loss of the last epoch's batches)``.
  """
  n = features.shape[0]
  steps = -(-n // batch_size)
  valid = jnp.ones((n,), features.dtype) if valid is None else valid.astype(features.dtype)
  num_valid = jnp.sum(valid > 0)
  tx = optax.sgd(learning_rate)

  def batch_loss(clf, idx, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits(clf, features[idx]), labels[idx])
    return jnp.sum(mask * ce) / jnp.maximum(jnp.sum(mask), 1.0)

  def step(carry, xs):
    clf, opt = carry
    idx, mask = xs
    loss, grads = jax.value_and_grad(batch_loss)(clf, idx, mask)
    updates, new_opt = tx.update(grads, opt, clf)
    active = jnp.sum(mask) > 0
    new = jax.tree.map(
      lambda a, b: jnp.where(active, a, b), (optax.apply_updates(clf, updates), new_opt), carry
    )
    return new, (loss, active)

  def epoch(carry, e):
    u = jax.random.uniform(jax.random.fold_in(key, e), (n,))
    order = jnp.argsort(jnp.where(valid > 0, u, 2.0))  # valid examples first, shuffled
    pos = jnp.arange(steps * batch_size)
    idx = jnp.concatenate([order, jnp.zeros((steps * batch_size - n,), order.dtype)])
    mask = (pos < num_valid).astype(features.dtype)
    xs = (idx.reshape(steps, batch_size), mask.reshape(steps, batch_size))
    carry, (losses, active) = jax.lax.scan(step, carry, xs)
    mean = jnp.sum(losses * active) / jnp.maximum(jnp.sum(active), 1)
    return carry, mean

  (classifier, _), losses = jax.lax.scan(
    epoch, (classifier, tx.init(classifier)), jnp.arange(epochs)
  )
  return classifier, losses[-1]
