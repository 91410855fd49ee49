"""Ratio Loss (Wang et al. 2021): the weighted client loss, the server's monitor, end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits

from fedllava import algorithms, errors, main, supervised
from fedllava.algorithms import base, ratioloss


def _np_ce(logits, labels):
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def test_ratio_loss_is_the_class_weighted_cross_entropy(x64):
  """Mutation caught: the class weights applied to the wrong classes (inverted, w[C-1-y]), or
  normalised by the sum of the weights instead of the count of real examples."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4))
  labels = np.array([0, 1, 2, 3, 3, 0], np.int32)
  valid = np.array([1, 1, 1, 1, 1, 0], np.float64)
  cw = np.array([1.0, 1.5, 2.5, 7.0])
  algo = ratioloss.create()
  got = algo.client_loss({"logits": jnp.asarray(logits)}, labels, valid, jnp.asarray(cw))
  want = np.sum(valid * cw[labels] * _np_ce(logits, labels)) / valid.sum()
  np.testing.assert_allclose(float(got), want, rtol=1e-12)
  # uniform weights: plain cross-entropy
  ones = algo.client_loss({"logits": jnp.asarray(logits)}, labels, valid, jnp.ones(4))
  plain = supervised.masked_cross_entropy(jnp.asarray(logits), labels, valid)
  np.testing.assert_allclose(float(ones), float(plain), rtol=1e-12)
  # the weights reach the clients as the message; the first round's are all 1
  state = algo.server_init({"params": {"classifier": {"kernel": jnp.zeros((2, 4))}}}, 4, None)
  np.testing.assert_array_equal(np.asarray(algo.message(None, state)), np.ones(4))


def _np_softmax(logits):
  p = np.exp(logits - logits.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


def _np_gradient_deltas(feats, labels, kernel, bias, c):
  """Delta_c = -dCE/dK of class c's mean cross-entropy at (K, b)."""
  p = _np_softmax(feats @ kernel + bias)
  deltas = []
  for cls in range(c):
    idx = labels == cls
    onehot = np.eye(c)[labels[idx]]
    deltas.append(-(feats[idx].T @ (p[idx] - onehot)) / idx.sum())
  return np.array(deltas)  # [C, D, C]


def _np_trained_deltas(feats, labels, kernel, bias, c, steps, lr, momentum, wd):
  """The authors' monitor (main_nn.py + Update.py LocalUpdate.train) on a linear model, by hand:
  for each class, a copy of (K, b) trained with PyTorch SGD(lr, momentum, weight_decay) on that
  class's images (one full batch per step, mean CE), Delta_c = K_after - K."""
  deltas = []
  for cls in range(c):
    x = feats[labels == cls]
    onehot = np.eye(c)[np.full(len(x), cls)]
    k, b = kernel.copy(), bias.copy()
    buf_k = buf_b = None
    for _ in range(steps):
      err = (_np_softmax(x @ k + b) - onehot) / len(x)
      gk = x.T @ err + wd * k
      gb = err.sum(0) + wd * b
      buf_k = gk if buf_k is None else momentum * buf_k + gk
      buf_b = gb if buf_b is None else momentum * buf_b + gb
      k, b = k - lr * buf_k, b - lr * buf_b
    deltas.append(k - kernel)
  return np.array(deltas)


def _np_weights(w, alpha, beta):
  """The authors' loops (models/Fed.py search_neuron_new + whole_determination) on [C, D, C]."""
  c = w.shape[0]
  pos = np.zeros_like(w)
  for i in range(w.shape[1]):
    for j in range(w.shape[2]):
      temp = list(w[:, i, j])
      m = temp.index(max(temp))
      if w[m, i, j] == 0:
        n = np.sum(np.array(temp) == 0)
      else:
        n = np.sum(np.abs(temp) / abs(w[m, i, j]) > 0.8)
      if n < 2:
        pos[m, i, j] = 1
  out = []
  for cls in range(c):
    own = other = 0.0
    for i in range(w.shape[1]):
      for j in range(w.shape[2]):
        if pos[cls, i, j]:
          own += w[cls, i, j]
          other += (w[:, i, j].sum() - w[cls, i, j]) / (c - 1)
    r = abs(own) / abs(other) if other != 0 else 10.0
    out.append(alpha + beta * min(r, 5000.0))
  return np.array(out)


def _linear_problem(c=3, d=5, k=4, seed=1):
  rng = np.random.default_rng(seed)
  feats = np.abs(rng.normal(size=(c * k, d)))  # post-ReLU features are >= 0
  labels = rng.permutation(np.repeat(np.arange(c), k)).astype(np.int32)  # classes interleaved
  kernel = rng.normal(size=(d, c))
  kernel[:, 0] += 1.0  # class 0 is the majority the model already favours
  bias = rng.normal(size=(c,))
  return feats, labels, kernel, bias


def _linear_model_fn(v, x, train=False):
  """A linear model on its inputs (features = the images), no BN."""
  clf = v["params"]["classifier"]
  out = {"features": x, "logits": x @ clf["kernel"] + clf["bias"]}
  return (out, v["batch_stats"]) if train else out


def _server_step(algo, feats, labels, kernel, bias, c):
  variables = {
    "params": {"classifier": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}},
    "batch_stats": {},
  }
  ctx = base.ServerContext(
    variables, algo.server_init(variables, c, None), None, {}, None,
    {"images": jnp.asarray(feats), "labels": jnp.asarray(labels)}, None,
  )  # fmt: skip
  out, state, metrics = algo.server_step(ctx, _linear_model_fn)
  assert out is variables
  return np.asarray(state["class_weights"]), metrics


def test_trained_monitor_matches_the_authors_local_training_on_a_linear_model(x64):
  """Oracle: on a linear model the monitor's local training is written by hand in numpy (PyTorch
  SGD with momentum and weight decay on each class's images alone, from the global model), then
  the authors' loops give the weights. Mutations caught (watched): weight decay ignored
  (``add_decayed_weights`` dropped: class 1 gets 19.3 instead of 4.53), momentum ignored, a class trained
  on another class's images (``class_batches`` without the sort), one step fewer."""
  c = 3
  feats, labels, kernel, bias = _linear_problem(c)
  steps, lr, mom, wd = 3, 0.5, 0.9, 0.05  # decay large enough to move the ratio visibly
  algo = ratioloss.create(
    1.0, 0.1, monitor="train", monitor_steps=steps, monitor_lr=lr, monitor_momentum=mom,
    monitor_weight_decay=wd,
  )  # fmt: skip
  got, metrics = _server_step(algo, feats, labels, kernel, bias, c)
  deltas = _np_trained_deltas(feats, labels, kernel, bias, c, steps, lr, mom, wd)
  want = _np_weights(deltas, 1.0, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert len(set(np.round(want, 6))) == c  # distinct weights: a permutation would show
  np.testing.assert_allclose(float(metrics["weight_max"]), want.max(), rtol=1e-10)
  # the decay matters here (else its mutation could pass unseen)
  plain = _np_weights(
    _np_trained_deltas(feats, labels, kernel, bias, c, steps, lr, mom, 0.0), 1, 0.1
  )
  assert np.max(np.abs(plain - want)) > 1e-3
  # the trained changes themselves, through the module function
  variables = {"params": {"classifier": {"kernel": kernel, "bias": bias}}, "batch_stats": {}}
  d = ratioloss.trained_updates(
    _linear_model_fn, variables, jnp.asarray(feats), jnp.asarray(labels), c, steps=steps,
    tx=ratioloss.sgd(lr, mom, wd),
  )  # fmt: skip
  np.testing.assert_allclose(np.asarray(d), deltas, rtol=1e-10, atol=1e-14)


def test_gradient_monitor_matches_the_authors_computation_on_a_linear_model(x64):
  """``monitor="gradient"`` (one full-batch gradient) on a linear model equals the authors' loops
  on numpy class gradients. Mutations caught: the ratio's numerator and denominator swapped, the
  weights assigned to the wrong classes (inverted), the dominance threshold ignored."""
  c = 3
  feats, labels, kernel, bias = _linear_problem(c)
  algo = ratioloss.create(alpha=1.0, beta=0.1, monitor="gradient")
  got, _ = _server_step(algo, feats, labels, kernel, bias, c)
  want = _np_weights(_np_gradient_deltas(feats, labels, kernel, bias, c), 1.0, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert len(set(np.round(want, 6))) == c
  # the estimate is invariant to the update's step size (first-order: SGD of any lr)
  d1 = ratioloss.class_updates(jnp.asarray(feats), labels, jnp.asarray(kernel), bias, c)
  np.testing.assert_allclose(
    np.asarray(ratioloss.monitor_ratios(d1)), np.asarray(ratioloss.monitor_ratios(0.01 * d1))
  )


def test_ratioloss_config_errors_name_the_field():
  for field, value in [
    ("alpha", -1.0),
    ("beta", float("nan")),
    ("aux_per_class", 0),
    ("monitor", "grad"),
    ("monitor_steps", 0),
    ("monitor_lr", -0.1),
    ("monitor_momentum", 1.0),
    ("monitor_weight_decay", -1e-4),
  ]:
    c = tiny_digits(1, **{"fl.algorithm": "ratioloss", f"fl.ratioloss.{field}": value})
    with pytest.raises(errors.ConfigError, match=f"config.fl.ratioloss.{field}"):
      algorithms.create(c.fl)


def test_ratioloss_runs_end_to_end(tmp_path):
  """main.run on the offline digits config, stage federate only, 2 rounds: the monitor's
  weights (the checkpointed method state) move off 1 after the first round."""
  out = main.run(
    tiny_digits(2, stages="federate", **{"fl.algorithm": "ratioloss"}), str(tmp_path / "r")
  )["federate"]
  assert 0.0 <= out.report["final"]["top1"] <= 100.0
  assert np.isfinite([float(np.sum(x)) for x in jax.tree.leaves(out.variables)]).all()


def test_labeled_server_set_is_balanced_and_held_by_no_client():
  """The monitor's images: aux_per_class of every class, with their labels, disjoint from the
  clients' long tail; every other method's pools are untouched. Mutation caught: the set drawn
  from the clients' pool (or the long tail drawn before the hold-out)."""
  from fedllava.data import federated

  cfg = tiny_digits(1, **{"fl.algorithm": "ratioloss", "fl.ratioloss.aux_per_class": 3})
  full = federated._load(cfg, "train")
  held, kept, labeled = federated._pools(cfg, full, aux=True)
  assert not set(labeled) & set(kept) and not set(labeled) & set(held)
  np.testing.assert_array_equal(np.bincount(full.labels[labeled]), [3] * full.num_classes)
  server = federated.build(cfg).labeled_server_data()
  np.testing.assert_array_equal(server["labels"], full.labels[labeled])
  np.testing.assert_array_equal(server["images"], full.images[labeled])
  other = tiny_digits(1)
  assert len(federated._pools(other, full)) == 2
  assert federated.build(other).labeled is None


def test_labeled_server_set_is_the_method_declaration_not_its_name(monkeypatch):
  """The data build reads the count from the method's module (``server_labeled_per_class``), so a
  new method with ``server_data="labeled_balanced"`` needs no edit in ``data/``; every module
  that declares one builds a method that asks for the set. Mutation caught: the build choosing
  the set by ``fl.algorithm == "ratioloss"`` again (the toy method gets no set)."""
  import types

  from fedllava.data import federated

  toy = types.SimpleNamespace(
    from_config=lambda fl: base.create("toy", server_data="labeled_balanced"),
    server_labeled_per_class=lambda fl: (2, "config.fl.toy.per_class"),
  )
  monkeypatch.setitem(algorithms.METHODS, "toy", toy)
  cfg = tiny_digits(1, **{"fl.algorithm": "toy"})
  assert federated.server_labeled_per_class(cfg) == (2, "config.fl.toy.per_class")
  full = federated._load(cfg, "train")
  labeled = federated._pools(cfg, full, aux=True)[2]
  np.testing.assert_array_equal(np.bincount(full.labels[labeled]), [2] * full.num_classes)
  for name, module in algorithms.METHODS.items():
    if hasattr(module, "server_labeled_per_class"):
      c = tiny_digits(1, **{"fl.algorithm": name})
      assert module.from_config(c.fl).server_data == "labeled_balanced", name
