"""The FL method contract: every registered method keeps the round one jitted computation that
is the same under vmap and map (float64), runs from its config section, and logs its uploads
by kind; plus the oracles of the methods that change one part each (FedAdam/FedYogi, Fed-Focal
Loss, tau-norm). Expected values are computed here (numpy / closed forms), never read back from
the module under test."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_digits

from fedllava import algorithms, sharding
from fedllava.algorithms import base, fedadam, fedfocal, taunorm
from fedllava.federate import client, rounds
from fedllava.models import resnet

SIZES = np.array([9, 5])
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _setup(algo, dtype="float64"):
  cfg = ml_collections.ConfigDict(dict(name="resnet8", width=4, dtype=dtype, conv_impl="im2col"))
  model = resnet.create_model(cfg, num_classes=3)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 9, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (2, 9)).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  variables = jax.tree.map(lambda x: x.astype(dtype), variables)
  trainer = client.create_local_trainer(
    model, algo, learning_rate=0.1, mean=MEAN, std=STD, crop_padding=1, flip=True,
    per_batch_augment=False,
  )  # fmt: skip
  inputs, ids = rounds.build_round_inputs(
    [0, 1], SIZES, 9, epochs=1, batch_size=4, seed=0, round_index=0, pad_to=2,
    aug_key=jax.random.PRNGKey(1),
  )  # fmt: skip
  inputs = inputs._replace(images=jnp.asarray(images[ids]), labels=jnp.asarray(labels[ids]))
  return model, trainer, variables, inputs


def _round(algo, strategy, dtype="float64"):
  _, trainer, variables, inputs = _setup(algo, dtype)
  state = base.init_server_state(algo, variables, 3, jax.random.PRNGKey(2))
  fn = rounds.create_round_fn(trainer, algo, sharding.create_client_mesh(1), strategy)
  pool = np.random.default_rng(5).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  data = jnp.asarray(pool) if algo.server_data == "unlabeled" else None
  if algo.server_data == "labeled_balanced":
    data = {"images": jnp.asarray(pool), "labels": jnp.arange(12, dtype=jnp.int32) % 3}
  if algo.server_data == "class_text_embeddings":  # CLIP2FL: unit text embeddings [C, F]
    dim = variables["params"]["classifier"]["kernel"].shape[0]
    text = np.random.default_rng(6).normal(size=(3, dim))
    data = jnp.asarray(text / np.linalg.norm(text, axis=1, keepdims=True))
  if algo.side_data == "teacher_logits":  # CLIP2FL: per-example teacher logits [M, N_max, C]
    side = np.random.default_rng(7).normal(size=inputs.labels.shape + (3,)) * 5
    inputs = inputs._replace(side=jnp.asarray(side))
  server = {"data": data, "key": jax.random.PRNGKey(3)}
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 (the round donates its inputs)
  return fn(copy(variables), copy(state), inputs, server), (trainer, variables, state)


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
def test_every_method_is_the_same_round_under_vmap_and_map(x64, name):
  algo = algorithms.create(tiny_digits(1, **{"fl.algorithm": name}).fl)
  (va, sa, ma), _ = _round(algo, "vmap")
  (vb, sb, mb), _ = _round(algo, "map")
  for x, y in zip(jax.tree.leaves((va, sa)), jax.tree.leaves((vb, sb)), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-10, rtol=0)
  assert bool(ma["finite"]) and bool(mb["finite"])


def test_upload_bytes_are_logged_by_kind():
  algo = algorithms.fedavg.create()
  (_, _, _), (trainer, variables, state) = _round(algo, "vmap", "float32")
  images = np.zeros((9, 8, 8, 3), np.uint8)
  got = rounds.upload_bytes_by_kind(trainer, algo, variables, images, state)
  n = sum(np.asarray(x).size * 4 for x in jax.tree.leaves(variables))
  assert got == {"parameters": n, "statistics": 0, "gradients": 0}

  def counts(model_fn, global_vars, local_vars, data, message):  # a per-class count upload
    return {"statistics": jnp.zeros((3,), jnp.float32) + jnp.sum(data.valid)}

  with_stats = algo._replace(client_upload=counts)
  got = rounds.upload_bytes_by_kind(trainer, with_stats, variables, images, state)
  assert got["statistics"] == 12 and got["gradients"] == 0
  # ... and the round hands the clients' uploads to the server step, counting only real examples
  seen = {}

  def server_step(ctx, model_fn):
    seen["uploads"] = ctx.uploads
    return ctx.variables, ctx.state, {"n": jnp.sum(ctx.uploads["statistics"][:, 0])}

  m = with_stats._replace(server_step=server_step, server_init=lambda v, c, k: jnp.zeros(()))
  (_, _, metrics), _ = _round(m, "vmap", "float32")
  assert float(metrics["server/n"]) == SIZES.sum()


# ---- FedAdam / FedYogi: the server step is Adam / Yogi on the mean delta ----
def _numpy_adam(deltas, lr, b1, b2, eps, yogi=False):
  """Adam (with bias correction, as Keras and optax) or Yogi on a sequence of gradients; Yogi's
  moments start at 1e-6 (Zaheer et al. 2018's initial accumulator, optax's default)."""
  m = v = 1e-6 if yogi else 0.0
  out = []
  for t, g in enumerate(deltas, 1):
    m = b1 * m + (1 - b1) * g
    if yogi:
      v = v - (1 - b2) * np.sign(v - g * g) * g * g
    else:
      v = b2 * v + (1 - b2) * g * g
    mh, vh = m / (1 - b1**t), v / (1 - b2**t)
    out.append(-lr * mh / (np.sqrt(vh) + eps))
  return out


@pytest.mark.parametrize("yogi", [False, True])
def test_fedadam_is_adam_on_the_size_weighted_mean_delta(x64, yogi):
  """Mutations caught: b2 ignored, no bias correction, the delta's sign flipped, uniform
  weights instead of |D_k| / sum |D_k|."""
  algo = fedadam.create(0.05, 0.9, 0.99, 1e-3, yogi=yogi)
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4,))
  weights = np.array([0.7, 0.3])
  opt = algo.server_optimizer.init({"w": jnp.asarray(w)})
  deltas, got, g = [], [], jnp.asarray(w)
  for _ in range(3):
    clients = g[None] + rng.normal(size=(2, 4))
    deltas.append(np.asarray(g) - (weights[0] * clients[0] + weights[1] * clients[1]))
    new, opt = base.server_update(
      algo, {"w": g}, opt, {"w": clients}, jnp.asarray(weights), jnp.ones(2)
    )
    got.append(np.asarray(new["w"]) - np.asarray(g))
    g = new["w"]
  want = _numpy_adam(deltas, 0.05, 0.9, 0.99, 1e-3, yogi)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ---- Fed-Focal Loss ----
def test_focal_loss_is_the_closed_form_and_gamma_0_is_cross_entropy(x64):
  """Mutations caught: gamma ignored, (1 - p_t) replaced by p_t, alpha ignored, padding counted."""
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(5, 4)), rng.integers(0, 4, 5)
  weights = np.array([1, 1, 1, 0, 1.0])
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  pt = p[np.arange(5), labels]
  want = (weights * (-0.5 * (1 - pt) ** 2.0 * np.log(pt))).sum() / weights.sum()
  loss = fedfocal.create(2.0, 0.5).client_loss
  got = loss({"logits": jnp.asarray(logits)}, jnp.asarray(labels), jnp.asarray(weights))
  np.testing.assert_allclose(float(got), want, rtol=1e-12)
  ce = (weights * -np.log(pt)).sum() / weights.sum()
  got0 = fedfocal.create(0.0, 1.0).client_loss(
    {"logits": jnp.asarray(logits)}, jnp.asarray(labels), jnp.asarray(weights)
  )
  np.testing.assert_allclose(float(got0), ce, rtol=1e-12)
  # the gradient w.r.t. the logits is the closed form of d FL / d z (Lin et al., App. A)
  g = jax.grad(lambda z: fedfocal.create(2.0, 1.0).client_loss({"logits": z}, labels, weights))(
    jnp.asarray(logits)
  )
  onehot = np.eye(4)[labels]
  dfl_dpt = 2.0 * (1 - pt) * np.log(pt) - (1 - pt) ** 2 / pt  # d/dpt of -(1-pt)^2 log pt
  dpt_dz = pt[:, None] * (onehot - p)
  want_g = weights[:, None] * dfl_dpt[:, None] * dpt_dz / weights.sum()
  np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-9, atol=1e-12)


# ---- tau-norm ----
def test_taunorm_normalises_each_class_column_and_drops_the_bias(x64):
  """Mutations caught: the norm over the wrong axis (features instead of classes), tau applied
  to the bias, the bias kept by default, the clients receiving the normalised model."""
  rng = np.random.default_rng(0)
  kernel, bias = rng.normal(size=(6, 3)), rng.normal(size=3)
  variables = {"params": {"classifier": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}}
  out = taunorm.create(0.7).eval_variables(variables, None)["params"]["classifier"]
  want = np.stack([kernel[:, i] / np.sqrt((kernel[:, i] ** 2).sum()) ** 0.7 for i in range(3)], 1)
  np.testing.assert_allclose(np.asarray(out["kernel"]), want, rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(out["bias"]), 0.0)
  same = taunorm.create(0.0, keep_bias=True).eval_variables(variables, None)
  for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # training is FedAvg's: the round (what the clients receive) equals FedAvg's round
  (v_tau, _, _), _ = _round(taunorm.create(0.7), "vmap")
  (v_avg, _, _), _ = _round(algorithms.fedavg.create(), "vmap")
  for x, y in zip(jax.tree.leaves(v_tau), jax.tree.leaves(v_avg)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
