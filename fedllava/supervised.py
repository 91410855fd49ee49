"""Supervised training and testing of the FL model, shared by the stages and the FL methods.

Stage 2's local step (``federate/client.py``), stage 3's alignment (``align/loss.py``), Table 4's
few-shot ablation (``pretrain/fewshot.py``) and server-side classifier re-training (CCVR, CReFF)
all train the FL model on uint8 images with a masked cross-entropy, and stages 2 and 3 both report
it on the balanced test set. Each piece is written once here; this module imports no stage.

* ``masked_cross_entropy``: the weighted mean of the per-example cross-entropy (weight 0 marks a
  padding example), the one formula of the verified round.
* ``create_epoch_loop``: shuffled epochs of fixed-shape padded batches, on-device augmentation and
  one optax step per batch, inside ``jax.lax.scan``; the caller supplies the loss and the optax
  transformation.
* ``create_test_evaluator``: predictions on the test set -> ``evaluate.classification_report``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from fedllava import evaluate, predict, sharding
from fedllava.data import augment

PyTree = Any
# (params, batch_stats, x, y, w, extras of the batch) -> (loss, (batch_stats, aux))
LossFn = Callable[..., tuple]


def cross_entropy(logits, labels):
  """Per-example cross-entropy of integer labels (optax's formulation).

  ``CE_i = logsumexp(p_i) - p_{i, y_i}``

  Args:
    logits: ``[B, C]``.
    labels: int ``[B]``.
  Returns:
    ``[B]``.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def weighted_mean(values, weights):
  """``sum_i w_i v_i / max(sum_i w_i, 1)``: the mean over the real examples of a padded batch.

  Args:
    values: ``[B]`` per-example values.
    weights: ``[B]``; 0 marks a padding example, 1 a real one.
  Returns:
    A scalar; 0 for a batch of padding only.
  """
  return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1.0)


def masked_cross_entropy(logits, labels, weights):
  """The mean cross-entropy over the real examples of a padded batch.

  ``L = sum_i w_i CE(y_i, p_i) / max(sum_i w_i, 1)``

  Args:
    logits: p, ``[B, C]``.
    labels: y, int ``[B]``.
    weights: ``[B]``; 0 marks a padding example.
  Returns:
    A scalar.
  """
  return weighted_mean(cross_entropy(logits, labels), weights)


def shuffled_batches(key, num_examples: int, batch_size: int, dtype=jnp.float32):
  """One epoch's batches: a permutation of ``num_examples`` cut into ``batch_size`` slices.

  The last batch is padded with index 0 and weight 0, so every step has one shape (a
  DataLoader with ``shuffle=True`` and no ``drop_last``).

  Args:
    key: the epoch's key (``jax.random.permutation(key, num_examples)``).
    num_examples: N.
    batch_size: B (at most N).
    dtype: the weights' dtype.
  Returns:
    ``(idx int32 [S, B], weight [S, B])`` with ``S = ceil(N / B)``.
  """
  n, b = int(num_examples), int(batch_size)
  steps = -(-n // b)
  idx = jnp.concatenate([jax.random.permutation(key, n), jnp.zeros(steps * b - n, jnp.int32)])
  w = (jnp.arange(steps * b) < n).astype(dtype)
  return idx.reshape(steps, b), w.reshape(steps, b)


def create_epoch_loop(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  *,
  num_examples: int,
  batch_size: int,
  epochs: Optional[int] = None,
  mean,
  std,
  crop_padding: int = 0,
  flip: bool = False,
  per_batch: bool = False,
  dtype=None,
) -> Callable:
  """Builds (unjitted) supervised training: shuffled epochs, one optax step per batch.

  Every step normalises and augments its batch on device, then

    ``(loss, (stats, aux)), g = value_and_grad(loss_fn)(params, stats, x, y, w, extras)``
    ``params <- optax.apply_updates(params, tx.update(g, opt, params))``

  The batch size is ``min(batch_size, num_examples)``; padding rows have ``w = 0``. Keys: the
  call's ``key`` splits into ``(k_plan, k_aug)``; step ``s`` augments with
  ``split(k_aug, steps)[s]``. With ``epochs=None`` the call is one epoch ordered by
  ``permutation(k_plan)`` (the caller carries the optimizer state across calls); with
  ``epochs=E`` it is E epochs in one scan, epoch e ordered by ``permutation(split(k_plan, E)[e])``.

  Args:
    loss_fn: ``(params, batch_stats, x, y, w, extras) -> (loss, (batch_stats, aux))``, ``extras``
      being the batch's rows of the call's ``extras`` (None when none were given).
    tx: the optax transformation.
    num_examples: N, the size of the training set (static: one compilation per size).
    batch_size: examples per step.
    epochs: see above.
    mean, std: per-channel normalisation applied to ``uint8 / 255``.
    crop_padding, flip, per_batch: see ``fedllava.data.augment.augment``.
    dtype: the dtype of the inputs and weights; None: the parameters' dtype.
  Returns:
    ``train(params, batch_stats, opt_state, uint8 images [N,H,W,C], labels [N], key,
    extras=None) -> ((params, batch_stats, opt_state), (loss [steps], aux [steps]))``.
  """
  n = int(num_examples)
  b = min(int(batch_size), n)

  def train(params, stats, opt, images, labels, key, extras=None):
    dt = jnp.result_type(*jax.tree.leaves(params)) if dtype is None else dtype
    k_plan, k_aug = jax.random.split(key)
    if epochs is None:
      idx, w = shuffled_batches(k_plan, n, b, dt)
    else:
      plan = lambda k: shuffled_batches(k, n, b, dt)  # noqa: E731
      idx, w = jax.vmap(plan)(jax.random.split(k_plan, epochs))
      idx, w = idx.reshape(-1, b), w.reshape(-1, b)
    step_keys = jax.random.split(k_aug, idx.shape[0])

    def body(carry, xs):
      params, stats, opt = carry
      i, wi, k = xs
      x = augment.augment(
        augment.normalize(images[i], mean, std, dt), k, crop_padding, flip, per_batch
      )
      ei = jax.tree.map(lambda e: e[i], extras)
      (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, x, labels[i], wi, ei
      )
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), stats, opt), (loss, aux)

    return jax.lax.scan(body, (params, stats, opt), (idx, w, step_keys))

  return train


def create_test_evaluator(
  model, norm, test, mesh, batch_size: int, num_classes: int, class_counts
) -> Callable[[PyTree], dict]:
  """``variables -> classification report`` on a test set; compiled once for every call.

  The FL model predicts every test image (eval-mode BN, batch split over ``mesh``,
  ``predict.predict_all``), and ``evaluate.classification_report`` scores the predictions.

  Args:
    model: the Flax FL model.
    norm: per-channel normalisation (``mean``, ``std``).
    test: the test set (``images`` uint8 ``[N,H,W,C]``, ``labels`` ``[N]``).
    mesh: the device mesh the batch is split over.
    batch_size: test images per call (``config.eval.batch_size``).
    num_classes: C.
    class_counts: training images per class (decides many/medium/few).
  Returns:
    ``evaluate_on_test(variables) -> dict`` (``evaluate.classification_report``).
  """
  fn = predict.create_predict_fn(model, norm.mean, norm.std, mesh)
  repl = sharding.replicated(mesh)

  def evaluate_on_test(variables):
    variables = jax.device_put(variables, repl)
    preds = predict.predict_all(fn, variables, test.images, batch_size, mesh)
    return evaluate.classification_report(test.labels, preds, num_classes, class_counts)

  return evaluate_on_test
