"""The global alignment loss (Eq. 6) and the loop that minimises it on D_align (Eq. 5)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedllava import supervised


def alignment_loss(logits, labels, teacher_logits, weights, beta: float, temperature: float = 1.0):
  """The global alignment loss (Eq. 6), a weighted mean over examples.

  ``L = CE(y, p) + beta * KL(softmax(q / T) || softmax(p / T))``; no ``T**2`` factor (beta
  absorbs it).

  Args:
    logits: p, the FL model's logits ``[B, C]``.
    labels: y, int ``[B]``.
    teacher_logits: q, CLIP's zero-shot logits ``[B, C]``, or None (then ``beta`` must be 0).
    weights: ``[B]``; 0 marks a padding example.
    beta: weight of the KL term.
    temperature: T.
  Returns:
    ``(loss, {"ce": ..., "kl": ...})`` scalars.
  """
  ce = supervised.cross_entropy(logits, labels)
  if teacher_logits is None:
    if beta:
      raise ValueError("beta > 0 needs teacher_logits (q)")
    kl = jnp.zeros_like(ce)
  else:
    log_q = jax.nn.log_softmax(teacher_logits.astype(logits.dtype) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  mean = lambda v: supervised.weighted_mean(v, weights)  # noqa: E731
  return mean(ce + beta * kl), {"ce": mean(ce), "kl": mean(kl)}


def _optimizer(a) -> optax.GradientTransformation:
  if a.optimizer == "sgd":
    return optax.sgd(a.learning_rate, momentum=a.momentum or None)
  return optax.adam(a.learning_rate)


def create_aligner(
  model, align_config, *, num_examples: int, mean, std, crop_padding=0, flip=False, per_batch=False
) -> Callable:
  """Builds the jitted alignment loop: ``align(variables, images, labels, q, key)``.

  Runs ``align_config.epochs`` shuffled passes over D_align in batches of
  ``align_config.batch_size`` (the last batch padded with weight-0 examples, so every step has
  one shape), one optax step each (Eq. 5), on ``supervised.create_epoch_loop``:

    ``w <- w - eta * grad_w L_align(w; batch)``     (Eq. 5, SGD; or Adam's step)

  A fresh optimizer state each call. ``q`` may be None when ``beta`` is 0.

  Returns:
    ``align(variables, uint8 images [N,H,W,C], labels [N], q [N,C] | None, key) ->
    (variables, {"align/loss", "align/ce", "align/kl"})`` (means over the steps).
  """
  a = align_config
  tx = _optimizer(a)
  head_only = a.params == "head"
  if head_only:
    tx = optax.multi_transform(
      {"head": tx, "frozen": optax.set_to_zero()},
      lambda params: {
        k: jax.tree.map(lambda _, k=k: "head" if k == "classifier" else "frozen", v)
        for k, v in params.items()
      },
    )
  bn_train = a.bn == "train" and not head_only
  beta, temperature = float(a.beta), float(a.temperature)

  def loss_fn(params, batch_stats, x, y, w, q):
    variables = {"params": params, "batch_stats": batch_stats}
    if bn_train:
      out, new = model.apply(variables, x, train=True, mask=w, mutable=["batch_stats"])
      batch_stats = new["batch_stats"]
    else:
      out = model.apply(variables, x, train=False)
    loss, aux = alignment_loss(out["logits"], y, q, w, beta, temperature)
    return loss, (batch_stats, (aux["ce"], aux["kl"]))

  train = supervised.create_epoch_loop(
    loss_fn,
    tx,
    num_examples=num_examples,
    batch_size=a.batch_size,
    epochs=a.epochs,
    mean=mean,
    std=std,
    crop_padding=crop_padding,
    flip=flip,
    per_batch=per_batch,
  )

  def align(variables, images, labels, q, key):
    params, stats = variables["params"], variables["batch_stats"]
    (params, stats, _), (loss, (ce, kl)) = train(
      params, stats, tx.init(params), images, labels, key, q
    )
    out = {"params": params, "batch_stats": stats}
    return out, {"align/loss": jnp.mean(loss), "align/ce": jnp.mean(ce), "align/kl": jnp.mean(kl)}

  return jax.jit(align)
