"""Server-side distillation on unlabeled images, shared by FedDF and FedBE.

The student (the aggregated model) is trained on batches of the server's unlabeled pool to match
fixed teacher probabilities ``p`` (computed once per round by the method, on the whole pool):

  L(w) = 1/B sum_b KL(p_b || softmax(f(x_b; w) / T))
       = 1/B sum_b sum_c p_bc (log p_bc - log softmax(f(x_b; w) / T)_c)

(PyTorch's ``kl_div(log_softmax(s / T), p, reduction="batchmean")``, FedDF's divergence). The
student runs in training mode, as both authors' codes do (``model.train()``): BN normalises
with the batch's statistics and its running statistics move with the batch (momentum 0.1); the
teachers run in eval mode. Each step draws ``batch_size`` pool indices uniformly with
replacement from ``fold_in(key, step)``: fixed shapes, one compile, and a resumed run replays
the same batches. Optional stochastic weight averaging (FedBE, torchcontrib's ``SWA``): after
step ``s`` (1-based) with ``s > swa_start`` and ``s % swa_every == 0`` the current variables
join a running mean; the result is that mean (the last iterate if none joined).

References:
  epfml/federated-learning-public-code, codes/FedDF-code/pcode/aggregation/
    adv_knowledge_transfer.py (``BaseKTSolver.divergence``: ``kl_div(log_softmax(s / T),
    softmax(t / T), reduction="batchmean")``; ``BaseKTSolver.prepare_model``: teachers
    ``eval()``, student ``train()``).
  hongyouc/FedBE, models/Update.py (``ServerUpdate.set_opt``: SGD lr 1e-3, momentum 0.9,
    weight decay 1e-5 wrapped in ``SWA(swa_start=500, swa_freq=25)``; ``ServerUpdate.train``:
    student ``net.train()``, ``swap_swa_sgd`` at the end). Line numbers are not given: the
    stored copies were read through a search index without them.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax


def kl_to_targets(student_logits: jax.Array, targets: jax.Array, temperature: float = 1.0):
  """``1/B sum_b KL(targets_b || softmax(student_logits_b / T))`` (``0 log 0 = 0``)."""
  logq = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  logp = jnp.log(jnp.where(targets > 0, targets, 1.0))
  return jnp.mean(jnp.sum(targets * (logp - logq), axis=-1))


def pool_outputs(model_fn: Callable, stacked_variables, images, coef) -> jax.Array:
  """``sum_k coef[k] * model_fn(variables_k, images)["logits"]`` over a stacked model axis.

  One model at a time (``lax.scan``), so memory is one model's outputs on the pool.
  """

  def body(acc, xs):
    variables, c = xs
    return acc + c * model_fn(variables, images)["logits"].astype(acc.dtype), None

  first = jax.tree.map(lambda x: x[0], stacked_variables)
  shape = jax.eval_shape(lambda v: model_fn(v, images)["logits"], first)
  init = jnp.zeros(shape.shape, coef.dtype)
  return jax.lax.scan(body, init, (stacked_variables, coef))[0]


def pool_probabilities(model_fn: Callable, stacked_variables, images, coef) -> jax.Array:
  """``sum_k coef[k] * softmax(model_fn(variables_k, images)["logits"])`` (lax.scan over k)."""

  def body(acc, xs):
    variables, c = xs
    logits = model_fn(variables, images)["logits"].astype(acc.dtype)
    return acc + c * jax.nn.softmax(logits, axis=-1), None

  first = jax.tree.map(lambda x: x[0], stacked_variables)
  shape = jax.eval_shape(lambda v: model_fn(v, images)["logits"], first)
  init = jnp.zeros(shape.shape, coef.dtype)
  return jax.lax.scan(body, init, (stacked_variables, coef))[0]


def distill(
  model_fn: Callable,
  variables,
  images: jax.Array,
  targets: jax.Array,
  key: jax.Array,
  *,
  steps: int,
  batch_size: int,
  tx: optax.GradientTransformation,
  temperature: float = 1.0,
  swa_start: Optional[int] = None,
  swa_every: int = 0,
):
  """Trains ``variables`` (the student) to match ``targets`` on ``images``; see the module doc.

  Args:
    model_fn: ``model_fn(variables, uint8 images, train=True) -> (outputs, new batch_stats)``.
    variables: the student ``{"params", "batch_stats"}``.
    images: uint8 ``[N, H, W, C]``, the unlabeled pool.
    targets: ``[N, C]`` teacher probabilities of every pool image.
    key: the round's server key (batches: ``fold_in(key, step)``).
    steps, batch_size: the number of optimizer steps and the images per step.
    tx: the student's optax optimizer.
    temperature: the student's softmax temperature (the targets are already probabilities).
    swa_start, swa_every: SWA as above; ``swa_every=0`` turns it off.
  Returns:
    ``(variables, mean loss over the steps)``.
  """
  n = images.shape[0]
  swa = swa_every > 0

  def loss_fn(params, batch_stats, x, p):
    out, stats = model_fn({"params": params, "batch_stats": batch_stats}, x, train=True)
    return kl_to_targets(out["logits"], p.astype(out["logits"].dtype), temperature), stats

  def step(carry, s):
    v, opt_state, avg, count = carry
    idx = jax.random.randint(jax.random.fold_in(key, s), (batch_size,), 0, n)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      v["params"], v["batch_stats"], images[idx], targets[idx]
    )
    updates, opt_state = tx.update(grads, opt_state, v["params"])
    v = {"params": optax.apply_updates(v["params"], updates), "batch_stats": stats}
    if swa:
      t = s + 1  # torchcontrib counts steps from 1
      join = (t > (swa_start or 0)) & (t % swa_every == 0)
      new_count = count + join.astype(count.dtype)
      frac = jnp.where(join, 1.0 / jnp.maximum(new_count, 1), 0.0)
      avg = jax.tree.map(lambda a, x: a + frac.astype(a.dtype) * (x - a), avg, v)
      count = new_count
    return (v, opt_state, avg, count), loss

  init = (variables, tx.init(variables["params"]), variables, jnp.zeros((), jnp.int32))
  (v, _, avg, count), losses = jax.lax.scan(step, init, jnp.arange(steps))
  if swa:
    v = jax.tree.map(lambda a, x: jnp.where(count > 0, a, x), avg, v)
  return v, jnp.mean(losses)
