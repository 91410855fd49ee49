"""Oracles of the classifier re-training methods: the shared re-training loop
(``algorithms/classifier.py``), CCVR's pooled class statistics and virtual features, CReFF's
client gradients and gradient matching; plus both methods end to end through ``main.run``.
Expected values come from numpy / PyTorch computations written here, never from the modules."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_digits

from fedllava import main, sharding
from fedllava.algorithms import base, ccvr, classifier, creff
from fedllava.federate import client, rounds
from fedllava.models import resnet

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZES = np.array([9, 6, 4])
# Client labels (positions past a client's size are padding and must not count: class 2 there).
LABELS = np.array(
  [[0, 0, 0, 1, 1, 0, 1, 0, 2], [1, 1, 1, 1, 0, 2, 2, 2, 2], [0, 1, 0, 0, 2, 2, 2, 2, 2]], np.int32
)


def _setup(algo):
  """A width-4 ResNet-8 (16 features) on 8x8 images, 3 classes, 3 clients + 1 padding client."""
  cfg = ml_collections.ConfigDict(
    dict(name="resnet8", width=4, dtype="float64", conv_impl="im2col")
  )
  model = resnet.create_model(cfg, num_classes=3)
  images = np.random.default_rng(0).integers(0, 256, (3, 9, 8, 8, 3), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)
  trainer = client.create_local_trainer(
    model, algo, learning_rate=0.1, mean=MEAN, std=STD, crop_padding=1, flip=True,
    per_batch_augment=False,
  )  # fmt: skip
  inputs, ids = rounds.build_round_inputs(
    [0, 1, 2], SIZES, 9, epochs=1, batch_size=4, seed=0, round_index=0, pad_to=4,
    aug_key=jax.random.PRNGKey(1),
  )  # fmt: skip
  inputs = inputs._replace(images=jnp.asarray(images[ids]), labels=jnp.asarray(LABELS[ids]))
  return trainer, variables, inputs, images


def _run_round(algo, trainer, variables, inputs, key=3):
  state = base.init_server_state(algo, variables, 3, jax.random.PRNGKey(2))
  fn = rounds.create_round_fn(trainer, algo, sharding.create_client_mesh(1), "vmap")
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 (the round donates its inputs)
  return fn(copy(variables), copy(state), inputs, {"data": None, "key": jax.random.PRNGKey(key)})


def _real_features(trainer, variables, images):
  """Per client, the features of its real examples under ``variables`` (eval mode)."""
  return [
    np.asarray(trainer.model_fn(variables, jnp.asarray(images[k]))["features"])[: SIZES[k]]
    for k in range(3)
  ]


# ---- the shared re-training loop ----
def _numpy_sgd(w, b, x, y, batches, lr):
  for idx in batches:
    z = x[idx] @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(w.shape[1])[y[idx]]) / len(idx)
    w, b = w - lr * x[idx].T @ dz, b - lr * dz.sum(0)
  return w, b


def test_retrain_is_sgd_over_shuffled_batches_keeping_the_last_partial_one(x64):
  """Mutations caught: the last partial batch dropped or averaged over B instead of its m
  examples, a padding (valid 0) example trained on, epochs ignored."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(4, 3)), np.array([0, 1, 1, 0])
  w0, b0 = rng.normal(size=(3, 2)), rng.normal(size=2)
  valid = np.array([1, 1, 1, 0.0])  # 3 real examples, batch 2: batches of 2 then 1
  clf = {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}
  for epochs in (1, 2):
    got, _ = classifier.retrain(
      clf, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(epochs), learning_rate=0.5,
      epochs=epochs, batch_size=2, valid=jnp.asarray(valid),
    )  # fmt: skip
    orders = list(itertools.permutations(range(3)))
    candidates = []
    for plan in itertools.product(orders, repeat=epochs):  # every shuffle of every epoch
      batches = [b for o in plan for b in (list(o[:2]), [o[2]])]
      candidates.append(_numpy_sgd(w0, b0, x, y, batches, 0.5))
    err = min(
      max(np.abs(np.asarray(got["kernel"]) - w).max(), np.abs(np.asarray(got["bias"]) - b).max())
      for w, b in candidates
    )
    assert err < 1e-12, (epochs, err)


def test_fresh_classifier_is_pytorch_linear_init():
  """Mutation caught: a bound other than 1/sqrt(fan_in) (e.g. 1/fan_in, or Flax's lecun)."""
  clf = classifier.fresh_classifier(jax.random.PRNGKey(0), 64, 500)
  k, b = np.asarray(clf["kernel"]), np.asarray(clf["bias"])
  assert k.shape == (64, 500) and b.shape == (500,)
  bound = 1 / 8
  assert np.abs(k).max() <= bound and np.abs(b).max() <= bound
  np.testing.assert_allclose(k.std(), bound / np.sqrt(3), rtol=0.03)  # uniform's std
  np.testing.assert_allclose(np.abs(k).max(), bound, rtol=0.01)


# ---- CCVR ----
def test_ccvr_pools_the_exact_class_mean_and_unbiased_covariance(x64):
  """The server's pooled statistics equal the mean / covariance (ddof 1) of all clients'
  features of a class pooled directly, computed with the global model the clients received.
  Mutations caught: ddof 0 (client or server), the clients' trained model instead of the
  received one, padding examples or the padding client counted, a class's statistics mixed
  with another's."""
  algo = ccvr.create(num_virtual=4, epochs=1, batch_size=4)

  def spy(ctx, model_fn):
    s = ctx.uploads["statistics"]
    total, mu, cov = ccvr.pool_statistics(s["counts"], s["means"], s["covs"])
    new_vars, state, m = algo.server_step(ctx, model_fn)
    return new_vars, state, {**m, "total": total, "mu": mu, "cov": cov}

  trainer, variables, inputs, images = _setup(algo)
  _, _, m = _run_round(algo._replace(server_step=spy), trainer, variables, inputs)
  feats = _real_features(trainer, variables, images)
  f = np.concatenate(feats)
  y = np.concatenate([LABELS[k, : SIZES[k]] for k in range(3)])
  for c in range(3):
    fc = f[y == c]
    assert float(m["server/total"][c]) == len(fc)
    np.testing.assert_allclose(np.asarray(m["server/mu"][c]), fc.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
      np.asarray(m["server/cov"][c]), np.cov(fc, rowvar=False, ddof=1), rtol=0, atol=1e-12
    )
  assert (y == 2).sum() == 2  # a tail class: its covariance is singular (2 < 16 features)


def test_ccvr_virtual_features_follow_each_class_own_singular_gaussian(x64):
  """Mutation caught: sampling class c from another class's covariance (or mean); Cholesky
  (fails on the singular covariance: NaN)."""
  rng = np.random.default_rng(0)
  dim = 6
  means = rng.normal(size=(3, dim)) * 3
  covs = []
  for rank, scale in ((1, 4.0), (2, 0.5), (6, 2.0)):
    a = rng.normal(size=(dim, rank)) * scale
    covs.append(a @ a.T / rank)
  covs = np.stack(covs)
  got = np.asarray(ccvr.sample_virtual(jax.random.PRNGKey(0), jnp.asarray(means), covs, 40000))
  assert np.all(np.isfinite(got))
  for c in range(3):
    np.testing.assert_allclose(got[c].mean(0), means[c], atol=0.1)
    err = np.abs(np.cov(got[c], rowvar=False) - covs[c]).max() / np.abs(covs[c]).max()
    assert err < 0.05, (c, err)
  # rank 1: every draw lies on mu + span(a)
  u = np.linalg.eigh(covs[0])[1][:, -1]
  resid = (got[0] - means[0]) - np.outer((got[0] - means[0]) @ u, u)
  assert np.abs(resid).max() < 1e-6


def test_ccvr_evaluates_the_calibrated_classifier_and_clients_get_fedavg(x64):
  """Mutations caught: the clients receiving the calibrated classifier, the evaluated model
  not calibrated, an unseen class given virtual features."""
  algo = ccvr.create(num_virtual=8, learning_rate=0.5, epochs=2, batch_size=4)
  trainer, variables, inputs, _ = _setup(algo)
  v_ccvr, state, m = _run_round(algo, trainer, variables, inputs)
  v_avg, _, _ = _run_round(base.create("fedavg"), *_setup(base.create("fedavg"))[:3])
  for x, y in zip(jax.tree.leaves(v_ccvr), jax.tree.leaves(v_avg)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  evaluated = base.evaluated(algo, v_ccvr, state)
  got = evaluated["params"]["classifier"]
  np.testing.assert_array_equal(np.asarray(got["kernel"]), state["method"]["classifier"]["kernel"])
  assert np.abs(np.asarray(got["kernel"]) - v_avg["params"]["classifier"]["kernel"]).max() > 1e-3
  assert np.isfinite(float(m["server/calibration_loss"]))


# ---- CReFF ----
def _torch_linear_grad(feats, c, kernel, bias):
  """d mean CE / d (weight, bias) of a PyTorch ``nn.Linear`` (weight = kernel^T) on ``feats``,
  all labelled ``c``; returned in our layout ([F, C], [C])."""
  lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1]).double()
  with torch.no_grad():
    lin.weight.copy_(torch.tensor(np.asarray(kernel).T))
    lin.bias.copy_(torch.tensor(np.asarray(bias)))
  x = torch.tensor(np.asarray(feats))
  loss = torch.nn.functional.cross_entropy(lin(x), torch.full((len(x),), c))
  gw, gb = torch.autograd.grad(loss, [lin.weight, lin.bias])
  return gw.numpy().T, gb.numpy()


def test_creff_client_gradient_is_pytorch_linear_ce_gradient_of_the_class(x64):
  """Per class: the CE gradient of a Linear layer on that class's examples (all of them when
  N_c <= grad_batch; with N_c > grad_batch one batch of grad_batch distinct ones per repeat).
  Mutations caught: another class's examples or label, padding examples counted, batch
  padded to grad_batch counted in the mean, has_class wrong."""
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(9, 5))
  labels = np.array([0, 0, 2, 0, 2, 2, 0, 1, 1], np.int32)
  valid = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0.0])  # class 1 only in the padding
  clf = classifier.fresh_classifier(jax.random.PRNGKey(1), 5, 3, jnp.float64)
  got = creff.client_gradients(
    jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(valid), clf, jax.random.PRNGKey(2),
    batch=4, repeats=3,
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(got["has_class"]), [1, 0, 1])
  np.testing.assert_array_equal(np.asarray(got["kernel"][1]), 0)
  w, b = _torch_linear_grad(feats[[2, 4, 5]], 2, clf["kernel"], clf["bias"])  # N_2 = 3 <= 4
  np.testing.assert_allclose(np.asarray(got["kernel"][2]), w, rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(got["bias"][2]), b, rtol=0, atol=1e-12)
  # class 0 has 4 examples, batch 2, one repeat: the gradient of one of the 6 pairs
  one = creff.client_gradients(
    jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(valid), clf, jax.random.PRNGKey(3),
    batch=2, repeats=1,
  )  # fmt: skip
  pairs = [
    _torch_linear_grad(feats[list(p)], 0, clf["kernel"], clf["bias"])[0]
    for p in itertools.combinations([0, 1, 3, 6], 2)
  ]
  assert min(np.abs(np.asarray(one["kernel"][0]) - p).max() for p in pairs) < 1e-12


def _torch_distance_wb(gwr, gws):
  """Gradient_matching_loss.py's ``distance_wb``, transcribed for 2-d / 1-d gradients."""
  if gwr.dim() == 1:
    gwr, gws = gwr.reshape(1, -1), gws.reshape(1, -1)
  dots = torch.sum(gwr * gws, dim=-1)
  return torch.sum(1 - dots / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001))


def test_creff_server_matches_features_as_the_authors_torch_code(x64):
  """Two matching steps of the server equal CReFF's ``update_feature_syn`` in PyTorch (double
  backward through the CE gradient of an ``nn.Linear``), with each class's target the
  equal-weight mean over the clients that hold it. Mutations caught: matching the wrong class's
  gradient, weighting clients by size (or counting clients without the class), one cosine over
  the whole weight gradient instead of per output row, a class without target matched."""
  rng = np.random.default_rng(0)
  num_classes, n, dim, m = 3, 4, 5, 3
  algo = creff.create(n, match_lr=0.1, match_steps=2, retrain_epochs=1, batch_size=4)
  variables = {"params": {"classifier": {"kernel": jnp.zeros((dim, num_classes), jnp.float64)}}}
  variables["params"]["classifier"]["bias"] = jnp.zeros((num_classes,), jnp.float64)
  state = algo.server_init(variables, num_classes, jax.random.PRNGKey(0))
  has = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0.0]])  # class 2: nobody
  grads = {
    "kernel": rng.normal(size=(m, num_classes, dim, num_classes)) * has[:, :, None, None],
    "bias": rng.normal(size=(m, num_classes, num_classes)) * has[:, :, None],
    "has_class": has,
  }
  weights = jnp.asarray([0.7, 0.2, 0.1])  # FedAvg weights: must not weight the gradients
  ctx = base.ServerContext(
    variables, state, None, {"gradients": jax.tree.map(jnp.asarray, grads)}, weights, None,
    jax.random.PRNGKey(5),
  )  # fmt: skip
  _, new_state, metrics = algo.server_step(ctx, None)

  lin = torch.nn.Linear(dim, num_classes).double()
  with torch.no_grad():
    lin.weight.copy_(torch.tensor(np.asarray(state["classifier"]["kernel"]).T))
    lin.bias.copy_(torch.tensor(np.asarray(state["classifier"]["bias"])))
  syn = torch.tensor(np.asarray(state["features"]).reshape(-1, dim), requires_grad=True)
  opt = torch.optim.SGD([syn], lr=0.1)
  targets = {}
  for c in range(num_classes):
    holders = [k for k in range(m) if has[k, c]]
    if holders:  # torch weight layout [C, F]
      targets[c] = [
        torch.tensor(sum(grads["kernel"][k, c] for k in holders).T / len(holders)),
        torch.tensor(sum(grads["bias"][k, c] for k in holders) / len(holders)),
      ]
  for _ in range(2):
    loss = torch.tensor(0.0, dtype=torch.float64)
    for c, real in targets.items():
      out = lin(syn[c * n : (c + 1) * n])
      ce = torch.nn.functional.cross_entropy(out, torch.full((n,), c))
      gs = torch.autograd.grad(ce, list(lin.parameters()), create_graph=True)
      loss = loss + sum(_torch_distance_wb(r, s) for r, s in zip(real, gs))
    opt.zero_grad()
    loss.backward()
    opt.step()
  want = syn.detach().numpy().reshape(num_classes, n, dim)
  np.testing.assert_allclose(np.asarray(new_state["features"]), want, rtol=0, atol=1e-12)
  np.testing.assert_allclose(float(metrics["match_loss"]), loss.item(), rtol=1e-12)
  # the re-trained classifier is fresh (not continued) and is next round's message
  assert not np.allclose(new_state["classifier"]["kernel"], state["classifier"]["kernel"])
  assert algo.message(variables, new_state) is new_state["classifier"]


def _round_with_uploads(algo):
  """One round of CReFF ``algo`` whose server step also reports the clients' gradient uploads:
  ``(variables, state, uploads, the classifier the server sent, (trainer, variables, images))``."""

  def spy(ctx, model_fn):
    new_vars, state, m = algo.server_step(ctx, model_fn)
    return new_vars, state, {**m, "uploads": ctx.uploads["gradients"]}

  trainer, variables, inputs, images = _setup(algo)
  v, state, m = _run_round(algo._replace(server_step=spy), trainer, variables, inputs)
  sent = base.init_server_state(algo, variables, 3, jax.random.PRNGKey(2))["method"]["classifier"]
  return v, state, m["server/uploads"], sent, (trainer, variables, images)


def test_creff_uploads_gradients_of_the_sent_classifier_on_the_global_backbone(x64):
  """The round's uploads are, per client and class, the PyTorch CE gradient of the classifier
  the server sent (``message``) on the received model's features; the evaluated model is the
  re-trained classifier while the clients get FedAvg's. Mutations caught: gradients of the
  FedAvg classifier or of the locally trained model, the padding client holding classes."""
  algo = creff.create(4, match_steps=1, retrain_epochs=1, batch_size=4, grad_batch=16, dsa=False)
  v, state, up, sent, (trainer, variables, images) = _round_with_uploads(algo)
  np.testing.assert_array_equal(np.asarray(up["has_class"][3]), 0)  # the padding client
  for k, feats in enumerate(_real_features(trainer, variables, images)):
    y = LABELS[k, : SIZES[k]]
    for c in range(3):
      assert float(up["has_class"][k, c]) == float((y == c).any())
      if (y == c).any():
        w, b = _torch_linear_grad(feats[y == c], c, sent["kernel"], sent["bias"])
        np.testing.assert_allclose(np.asarray(up["kernel"][k, c]), w, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(up["bias"][k, c]), b, rtol=0, atol=1e-10)
  v_avg, _, _ = _run_round(base.create("fedavg"), *_setup(base.create("fedavg"))[:3])
  for x, y in zip(jax.tree.leaves(v), jax.tree.leaves(v_avg)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  got = base.evaluated(algo, v, state)["params"]["classifier"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got), state["method"]["classifier"]["kernel"])


def test_creff_dsa_gradients_are_of_one_whole_batch_augmented_before_the_backbone(x64):
  """With DSA (strategy "flip": a batch is mirrored whole or not at all) and one repeat over all
  of a class's examples, each upload is the PyTorch CE gradient on the backbone's features of
  the class's images, either all mirrored or none; both occur. Mutations caught: DSA left out
  (never mirrored), per-example draws (a mix matches neither), the flip after the backbone."""
  algo = creff.create(
    4, match_steps=1, retrain_epochs=1, batch_size=4, grad_batch=16, grad_repeats=1,
    dsa_strategy="flip",
  )  # fmt: skip
  _, _, up, sent, (trainer, variables, images) = _round_with_uploads(algo)
  plain = _real_features(trainer, variables, images)
  mirrored = _real_features(trainer, variables, images[:, :, :, ::-1])
  seen = set()
  for k in range(3):
    y = LABELS[k, : SIZES[k]]
    for c in set(y.tolist()):
      errs = []
      for feats in (plain[k], mirrored[k]):
        w, b = _torch_linear_grad(feats[y == c], c, sent["kernel"], sent["bias"])
        errs.append(max(np.abs(up["kernel"][k, c] - w).max(), np.abs(up["bias"][k, c] - b).max()))
      assert min(errs) < 1e-10, errs
      seen.add(int(np.argmin(errs)))
  assert seen == {0, 1}


# ---- end to end ----
@pytest.mark.parametrize(
  "name, extra",
  [
    ("ccvr", {"fl.ccvr.num_virtual": 20}),
    ("creff", {"fl.creff.retrain_epochs": 3, "fl.creff.match_steps": 5}),
  ],
)
def test_method_runs_end_to_end_on_digits(tmp_path, name, extra):
  cfg = tiny_digits(2, stages="federate", **{"fl.algorithm": name, **extra})
  out = main.run(cfg, str(tmp_path))["federate"]
  assert 0 <= out.report["final"]["top1"] <= 100
  rows = [
    json.loads(s) for s in (tmp_path / "federate" / "metrics.jsonl").read_text().split("\n")[:-1]
  ]
  kind = "statistics" if name == "ccvr" else "gradients"
  assert rows[-1][f"comm/upload_bytes_per_client/{kind}"] > 0
  assert any(k.startswith("server/") for k in rows[-1])


@pytest.mark.parametrize(
  "override, message",
  [
    ({"fl.algorithm": "ccvr", "fl.ccvr.num_virtual": 0}, "fl.ccvr.num_virtual"),
    ({"fl.algorithm": "ccvr", "fl.ccvr.learning_rate": float("nan")}, "fl.ccvr.learning_rate"),
    ({"fl.algorithm": "creff", "fl.creff.grad_repeats": 0}, "fl.creff.grad_repeats"),
    ({"fl.algorithm": "creff", "fl.creff.match_lr": -1.0}, "fl.creff.match_lr"),
    ({"fl.algorithm": "creff", "fl.creff.dsa_strategy": "color_blur"}, "fl.creff.dsa_strategy"),
  ],
)
def test_bad_method_config_names_the_field(override, message):
  with pytest.raises(ValueError, match=message):
    main.validate(tiny_digits(1, **override))


LAPACK_ON_8_DEVICES = """
import jax, jax.numpy as jnp
from fedllava import sharding
from fedllava.algorithms import ccvr

mesh = sharding.create_client_mesh()
assert mesh.size == 8, mesh.size
repl = sharding.replicated(mesh)

def f(x):
  def body(carry, _):  # [C, F, F] singular covariances (rank 30 < F = 64), as CCVR's tail classes
    covs = jnp.einsum("cnf,cng->cfg", carry, carry) / 29.0
    v = ccvr.sample_virtual(jax.random.PRNGKey(0), jnp.mean(carry, 1), covs, 4)
    return carry + 1e-3 * v[:, :1, :], jnp.sum(v)
  return jnp.sum(jax.lax.scan(body, x, None, length=30)[1])

x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (10, 30, 64)), repl)
print(float(jax.jit(f, in_shardings=repl, out_shardings=repl)(x)))
"""


def test_ccvr_sampler_does_not_deadlock_on_8_cpu_devices():
  """CCVR's ``eigh``, replicated on 8 host devices of a 2-core machine, finishes.

  jaxlib's CPU LAPACK deadlocked when every device thread called it at once, in two ways (gdb):
  a batched ``eigh`` waits in ``ParallelBatchMap`` for chunks it queued on XLA's thread pool,
  and scipy's OpenBLAS thread server parks its concurrent callers in ``exec_blas_async``. The
  first CCVR round on digits never finished. Now the sampler calls ``eigh`` one class at a
  time and ``sharding.create_client_mesh`` limits that BLAS to one thread. Mutations caught
  (watched, each killed at a 60 s timeout in 2 of 2 runs): the batched ``jnp.linalg.eigh(covs)``
  back in ``sample_virtual``; ``single_threaded_cpu_lapack`` left out of ``create_client_mesh``.
  """
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  try:
    out = subprocess.run(
      [sys.executable, "-c", LAPACK_ON_8_DEVICES],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
    )
  except subprocess.TimeoutExpired:
    pytest.fail("the replicated eigh on 8 CPU devices hung (LAPACK deadlock)")
  assert out.returncode == 0, out.stderr[-2000:]
