"""Oracles of the server-distillation methods (FedDF, FedBE) and their shared loop.

Expected values come from numpy / a direct ``model.apply`` written here, never from the module
under test; the docstring of each test names the mutations it catches."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import tiny_digits

from fedllava import main
from fedllava.algorithms import base, distill, fedbe, feddf
from fedllava.federate import client
from fedllava.models import resnet

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _models(num, seed=0):
  """A width-4 ResNet-8 (3 classes), ``num`` differently initialised models stacked, a pool."""
  cfg = ml_collections.ConfigDict(
    dict(name="resnet8", width=4, dtype="float64", conv_impl="im2col")
  )
  model = resnet.create_model(cfg, num_classes=3)
  init = lambda k: model.init(jax.random.PRNGKey(k), jnp.zeros((1, 8, 8, 3)))  # noqa: E731
  variables = [jax.tree.map(lambda x: x.astype("float64"), init(seed + k)) for k in range(num)]
  for k, v in enumerate(variables):  # distinct BN statistics too (eval mode reads them)
    v["batch_stats"] = jax.tree.map(lambda x: x + 0.1 * k, v["batch_stats"])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *variables)
  pool = np.random.default_rng(seed).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  return model, variables, stacked, jnp.asarray(pool)


def _logits(model, variables, pool):
  """Eval-mode logits computed here: ``(x / 255 - mean) / std`` then ``model.apply``."""
  x = (np.asarray(pool, np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
  return np.asarray(model.apply(variables, jnp.asarray(x), train=False)["logits"])


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_kl_loss_is_the_numpy_kl_at_temperature(x64):
  """Mutations caught: KL in the wrong direction, T applied to the targets twice or not to the
  student, a sum instead of the batch mean."""
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(5, 4)), _softmax(rng.normal(size=(5, 4)))
  t[0] = [0.5, 0.5, 0.0, 0.0]  # 0 log 0 = 0
  q = _softmax(s / 2.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    want = np.nansum(t * (np.log(t) - np.log(q)), -1).mean()
  got = distill.kl_to_targets(jnp.asarray(s), jnp.asarray(t), 2.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-12)


def test_feddf_teacher_is_the_average_of_real_clients_logits(x64, monkeypatch):
  """With ONE real client the teacher targets the step uses are that client's own softmax.
  Mutations caught: padding clients counted in the ensemble, probabilities averaged instead of
  logits (Alg. 1 / the code's ``avg_logits``), clients weighted by size instead of 1/|S_t|,
  the temperature left out of the teacher."""
  model, variables, stacked, pool = _models(3)
  model_fn = client.create_model_fn(model, MEAN, STD)
  logits = [_logits(model, v, pool) for v in variables]
  seen = {}
  real = distill.distill

  def spy(model_fn, v, images, targets, key, **kw):
    seen["targets"] = np.asarray(targets)
    return real(model_fn, v, images, targets, key, **kw)

  monkeypatch.setattr(feddf.distill, "distill", spy)
  algo = feddf.create(steps=1, batch_size=4, temperature=2.0)
  ctx = base.ServerContext(
    variables[0], None, stacked, {}, jnp.asarray([1.0, 0.0, 0.0]), pool, jax.random.PRNGKey(0)
  )
  algo.server_step(ctx, model_fn)  # eagerly: the spy sees concrete targets
  np.testing.assert_allclose(seen["targets"], _softmax(logits[0] / 2.0), rtol=1e-10, atol=1e-12)
  # two real clients of unequal size, one padding client: softmax of the plain mean of logits
  w = jnp.asarray([0.8, 0.2, 0.0])
  got = feddf.teacher_probabilities(model_fn, stacked, w, pool, 1.0)
  want = _softmax((logits[0] + logits[1]) / 2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
  avg_probs = (_softmax(logits[0]) + _softmax(logits[1])) / 2
  assert np.abs(want - avg_probs).max() > 1e-3  # the test tells the two apart


def test_distill_step_and_swa_schedule_match_numpy(x64):
  """The shared loop on a linear student ``logits = x W`` (no BN) with SGD: every step is the
  numpy gradient of the batch-mean KL at the indices ``fold_in(key, step)`` draws, and SWA
  averages the iterates after steps t > swa_start with t % swa_every == 0 (torchcontrib).
  Mutations caught: SWA off by one step (counting from 0), the last iterate returned instead
  of the average, the gradient of the wrong KL direction."""
  rng = np.random.default_rng(1)
  pool = rng.normal(size=(6, 4))
  targets = _softmax(rng.normal(size=(6, 3)))
  w0 = rng.normal(size=(4, 3))

  def model_fn(v, x, train=False):
    assert train
    return {"logits": x @ v["params"]["w"]}, v["batch_stats"]

  key, lr, steps = jax.random.PRNGKey(3), 0.5, 7
  got, _ = distill.distill(
    model_fn, {"params": {"w": jnp.asarray(w0)}, "batch_stats": {}}, jnp.asarray(pool),
    jnp.asarray(targets), key, steps=steps, batch_size=3, tx=optax.sgd(lr), swa_start=2,
    swa_every=2,
  )  # fmt: skip
  w, joined = w0.copy(), []
  for s in range(steps):
    idx = np.asarray(jax.random.randint(jax.random.fold_in(key, s), (3,), 0, 6))
    x, p = pool[idx], targets[idx]
    q = _softmax(x @ w)
    w = w - lr * x.T @ (q - p) / 3  # d/dz KL(p || softmax(z)) = softmax(z) - p
    if s + 1 > 2 and (s + 1) % 2 == 0:
      joined.append(w.copy())
  assert len(joined) == 2  # steps 4 and 6
  np.testing.assert_allclose(np.asarray(got["params"]["w"]), np.mean(joined, 0), rtol=1e-10)


def test_fedbe_gaussian_samples_and_ensemble(x64):
  """The Gaussian is the size-weighted mean and element-wise variance of the real clients; with
  var_scale 0 every sample is the mean model; the pseudo-labels are the mean softmax over
  samples + real clients + the mean model. Mutations caught: unweighted variance, padding
  clients in the Gaussian or the ensemble, the mean model left out of the ensemble."""
  model, variables, stacked, pool = _models(4)
  model_fn = client.create_model_fn(model, MEAN, STD)
  weights = np.array([0.5, 0.3, 0.2, 0.0])
  mu, var = fedbe.gaussian(stacked["params"], jnp.asarray(weights))
  flat = [np.asarray(x) for x in jax.tree.leaves(stacked["params"])]
  for x, m, v in zip(flat, jax.tree.leaves(mu), jax.tree.leaves(var), strict=True):
    want_m = np.tensordot(weights, x, 1)
    want_v = np.tensordot(weights, (x - want_m) ** 2, 1)
    np.testing.assert_allclose(np.asarray(m), want_m, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(v), want_v, rtol=1e-10, atol=1e-14)
  mean_vars = {"params": mu, "batch_stats": variables[0]["batch_stats"]}
  zero = fedbe.sample_models(mean_vars, var, jax.random.PRNGKey(0), 3, 0.0)
  for s in range(3):
    for a, b in zip(
      jax.tree.leaves(jax.tree.map(lambda x: x[s], zero)), jax.tree.leaves(mean_vars)
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sampled = fedbe.sample_models(mean_vars, var, jax.random.PRNGKey(0), 2, 1.0)
  got = fedbe.ensemble_probabilities(
    model_fn, mean_vars, stacked, jnp.asarray(weights), sampled, pool
  )
  members = [jax.tree.map(lambda x: x[s], sampled) for s in range(2)] + variables[:3] + [mean_vars]
  want = np.mean([_softmax(_logits(model, v, pool)) for v in members], 0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
  # the samples spread: each leaf's empirical deviation from mu is sqrt(var) * N(0, 1)
  d = [
    np.asarray(a[0] - m) for a, m in zip(jax.tree.leaves(sampled["params"]), jax.tree.leaves(mu))
  ]
  assert all(np.all((v == 0) <= (x == 0)) for x, v in zip(d, jax.tree.leaves(var)))


@pytest.mark.parametrize("name", ["feddf", "fedbe"])
def test_distillation_methods_run_end_to_end(tmp_path, name):
  """main.run on the offline digits config, stage federate only, 1 round."""
  out = main.run(tiny_digits(1, stages="federate", **{"fl.algorithm": name}), str(tmp_path / name))[
    "federate"
  ]
  assert 0.0 <= out.report["final"]["top1"] <= 100.0
  assert np.isfinite([float(np.sum(x)) for x in jax.tree.leaves(out.variables)]).all()
