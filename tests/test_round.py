"""Oracles for the federated round: vmapped + scanned + padded + sharded = a plain loop.

Whole rounds are compared in float64 (two correct float32 implementations of BN training
drift apart by ~1e-4 after a few steps; DESIGN.md, "The CReFF protocol").
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedllava import algorithms, sharding
from fedllava.federate import client, rounds
from fedllava.models import onednn_conv, resnet

SIZES = np.array([11, 5, 8])  # unequal clients; batch 4 gives partial batches
BATCH, EPOCHS, LR = 4, 2, 0.1
# CIFAR-10's statistics: a real normalisation, not mean 0 / std 1, so the oracles see it.
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _fedavg_weights(ids, n_real):
  """FedAvg's p_k = |D_k| / sum |D_k| from the test's own client sizes (not the code's)."""
  n = SIZES[np.asarray(ids[:n_real])].astype(np.float64)
  return n / n.sum()


def _model(dtype="float64", conv_impl="auto"):
  cfg = ml_collections.ConfigDict(dict(name="resnet8", width=4, dtype=dtype, conv_impl=conv_impl))
  return resnet.create_model(cfg, num_classes=3)


def _setup(dtype="float64", conv_impl="auto"):
  model = _model(dtype, conv_impl)
  rng = np.random.default_rng(0)
  n_max = int(SIZES.max())
  images = rng.integers(0, 256, (len(SIZES), n_max, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (len(SIZES), n_max)).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  variables = jax.tree.map(lambda x: x.astype(dtype), variables)
  # Non-trivial running statistics so their averaging is visible.
  variables["batch_stats"] = jax.tree.map(lambda x: x + 0.1, variables["batch_stats"])
  return model, images, labels, variables


def _trainer(model, algorithm, per_batch=False):
  return client.create_local_trainer(
    model,
    algorithm,
    learning_rate=LR,
    mean=MEAN,
    std=STD,
    crop_padding=1,
    flip=True,
    per_batch_augment=per_batch,
  )


def _inputs(images, labels, selected, pad_to, seed=3, round_index=0):
  inputs, ids = rounds.build_round_inputs(
    selected,
    SIZES,
    int(SIZES.max()),
    epochs=EPOCHS,
    batch_size=BATCH,
    seed=seed,
    round_index=round_index,
    pad_to=pad_to,
    aug_key=jax.random.PRNGKey(7),
  )
  return inputs._replace(
    images=jnp.asarray(images[ids]),
    labels=jnp.asarray(labels[ids]),
    weights=jnp.asarray(inputs.weights),
  ), ids


def _loop_round(trainer, variables, images, labels, inputs, ids, n_real):
  """The oracle: each client alone, only its real steps, unpadded partial batches."""
  step = jax.jit(trainer.step)
  results = []
  for c in range(n_real):
    carry = trainer.init_carry(variables)
    for s in np.nonzero(np.asarray(inputs.plan.active[c]))[0]:
      m = int(inputs.plan.weight[c, s].sum())
      idx = jnp.asarray(inputs.plan.idx[c, s, :m])
      key = jax.random.fold_in(inputs.keys[c], int(s))
      carry, _ = step(
        carry,
        jnp.asarray(images[ids[c]]),
        jnp.asarray(labels[ids[c]]),
        variables["params"],
        idx,
        jnp.ones(m, jax.tree.leaves(variables)[0].dtype),
        True,
        key,
      )
    results.append({"params": carry[0], "batch_stats": carry[1]})
  w = _fedavg_weights(ids, n_real)
  return jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *results)


def _assert_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize(
  "strategy, conv_impl",
  [("vmap", "xla"), ("vmap", "im2col"), ("map", "im2col"), ("map", "eigen"), ("vmap", "eigen")],
)
def test_vmapped_round_equals_per_client_loop(x64, strategy, conv_impl):
  model, images, labels, variables = _setup(conv_impl=conv_impl)
  algo = algorithms.fedavg.create()
  trainer = _trainer(model, algo)
  mesh = sharding.create_client_mesh(1)
  inputs, ids = _inputs(images, labels, [0, 1, 2], pad_to=3)
  round_fn = rounds.create_round_fn(trainer, algo, mesh, strategy)
  copy = jax.tree.map(jnp.array, variables)
  new, _, metrics = round_fn(copy, algo.server_optimizer.init(variables["params"]), inputs)
  expected = _loop_round(trainer, variables, images, labels, inputs, ids, 3)
  _assert_close(new, expected, 1e-10)
  # Unequal sizes really give unequal step counts: ceil(n / 4) * epochs.
  np.testing.assert_array_equal(metrics["train/client_steps"], [6, 4, 4])
  # Training moved the model.
  assert (
    np.abs(
      np.asarray(new["params"]["classifier"]["kernel"])
      - np.asarray(variables["params"]["classifier"]["kernel"])
    ).max()
    > 1e-4
  )


def test_auto_parallelism_resolves_per_backend_and_equals_the_resolved_strategy(x64, monkeypatch):
  """``fl.client_parallelism="auto"`` takes ``rounds.AUTO[backend]`` (what fl_round.py measured
  fastest: map on CPU and GPU, vmap elsewhere), and a round with it is the resolved one."""
  for backend, expected in [("cpu", "map"), ("gpu", "map"), ("cuda", "map"), ("tpu", "vmap")]:
    assert rounds.resolve_strategy("auto", backend) == expected
  assert rounds.resolve_strategy("group") == "group"  # explicit choices pass through
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert rounds.resolve_strategy("auto") == "vmap"
  monkeypatch.undo()
  assert rounds.resolve_strategy("auto") == rounds.AUTO[jax.default_backend()]
  model, images, labels, variables = _setup()
  algo = algorithms.fedavg.create()
  trainer = _trainer(model, algo)
  mesh = sharding.create_client_mesh(1)
  inputs, _ = _inputs(images, labels, [0, 1, 2], pad_to=3)
  out = {}
  for strategy in ("auto", rounds.resolve_strategy("auto")):
    copy = jax.tree.map(jnp.array, variables)
    st = algo.server_optimizer.init(copy["params"])
    out[strategy] = rounds.create_round_fn(trainer, algo, mesh, strategy)(copy, st, inputs)[0]
  for a, b in zip(*(jax.tree.leaves(v) for v in out.values())):
    np.testing.assert_array_equal(a, b)


def test_round_on_8_devices_equals_1_device(x64):
  assert len(jax.devices()) >= 8, "tests/conftest.py should simulate 8 CPU devices"
  model, images, labels, variables = _setup()
  algo = algorithms.fedavg.create()
  trainer = _trainer(model, algo)
  outs = []
  for n_dev in (1, 8):
    mesh = sharding.create_client_mesh(n_dev)
    inputs, _ = _inputs(images, labels, [0, 1, 2], pad_to=sharding.pad_to_multiple(3, mesh))
    fn = rounds.create_round_fn(trainer, algo, mesh, "vmap")
    v = jax.tree.map(jnp.array, variables)
    outs.append(fn(v, algo.server_optimizer.init(v["params"]), inputs)[0])
  _assert_close(outs[0], outs[1], 1e-10)


def test_group_strategy_and_padding_clients_change_nothing(x64):
  model, images, labels, variables = _setup()
  algo = algorithms.fedavg.create()
  trainer = _trainer(model, algo)
  mesh = sharding.create_client_mesh(1)
  a, _ = _inputs(images, labels, [0, 1, 2], pad_to=3)
  b, _ = _inputs(images, labels, [0, 1, 2], pad_to=4)  # one padding client
  state = algo.server_optimizer.init(variables["params"])
  out_a = rounds.create_round_fn(trainer, algo, mesh, "vmap")(
    jax.tree.map(jnp.array, variables), state, a
  )[0]
  out_b = rounds.create_round_fn(trainer, algo, mesh, "group", group_size=2)(
    jax.tree.map(jnp.array, variables), state, b
  )[0]
  _assert_close(out_a, out_b, 1e-10)


def test_masked_step_changes_nothing(x64):
  model, images, labels, variables = _setup()
  trainer = _trainer(model, algorithms.fedavg.create())
  carry = trainer.init_carry(variables)
  # Give the optimizer state something to lose: a momentum-free SGD has an empty state, so
  # check a real step first changes params and stats, then a masked one does not.
  idx = jnp.arange(BATCH)
  args = (
    jnp.asarray(images[0]),
    jnp.asarray(labels[0]),
    variables["params"],
    idx,
    jnp.ones(BATCH),
  )
  moved, _ = trainer.step(carry, *args, True, jax.random.PRNGKey(1))
  kept, loss = trainer.step(moved, *args, False, jax.random.PRNGKey(2))
  _assert_close(kept, moved, 0.0)
  assert float(loss) == 0.0
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), moved[:2], carry[:2])
  assert max(jax.tree.leaves(diff)) > 1e-6


def test_partial_batch_is_a_step_on_its_examples_only(x64):
  """A padded batch with weights [1,1,1,0] equals an unpadded batch of 3: loss and BN stats."""
  model, images, labels, variables = _setup()
  trainer = _trainer(model, algorithms.fedavg.create())
  carry = trainer.init_carry(variables)
  key = jax.random.PRNGKey(5)
  im, lb = jnp.asarray(images[0]), jnp.asarray(labels[0])
  padded, lp = trainer.step(
    carry,
    im,
    lb,
    variables["params"],
    jnp.array([3, 1, 7, 0]),
    jnp.array([1.0, 1.0, 1.0, 0.0]),
    True,
    key,
  )
  plain, l3 = trainer.step(
    carry, im, lb, variables["params"], jnp.array([3, 1, 7]), jnp.ones(3), True, key
  )
  _assert_close(padded, plain, 1e-12)
  np.testing.assert_allclose(lp, l3, atol=1e-12)


def _one_round(algo, variables, images, labels, selected=(0, 1, 2)):
  trainer = _trainer(_model(), algo)
  mesh = sharding.create_client_mesh(1)
  inputs, _ = _inputs(images, labels, list(selected), pad_to=len(selected))
  fn = rounds.create_round_fn(trainer, algo, mesh, "vmap")
  v = jax.tree.map(jnp.array, variables)
  return fn(v, algo.server_optimizer.init(v["params"]), inputs)[0]


def test_fedprox_mu0_and_fedavgm_momentum0_equal_fedavg(x64):
  _, images, labels, variables = _setup()
  ref = _one_round(algorithms.fedavg.create(), variables, images, labels)
  _assert_close(_one_round(algorithms.fedprox.create(0.0), variables, images, labels), ref, 1e-12)
  _assert_close(_one_round(algorithms.fedavgm.create(0.0), variables, images, labels), ref, 1e-12)
  # And the knobs do something when turned on.
  prox = _one_round(algorithms.fedprox.create(10.0), variables, images, labels)
  assert not np.allclose(
    prox["params"]["classifier"]["kernel"], ref["params"]["classifier"]["kernel"]
  )


def test_fednova_equals_fedavg_when_step_counts_are_equal(x64):
  _, images, labels, variables = _setup()
  # Clients 1 and 2 have 5 and 8 examples: 2 steps per epoch each.
  ref = _one_round(algorithms.fedavg.create(), variables, images, labels, (1, 2))
  nova = _one_round(algorithms.fednova.create(), variables, images, labels, (1, 2))
  _assert_close(nova, ref, 1e-12)


def test_fednova_server_rule_by_hand(x64):
  g = {"w": jnp.array([1.0, 2.0])}
  c = {"w": jnp.array([[0.0, 2.0], [1.0, 0.0]])}
  p = jnp.array([0.25, 0.75])
  tau = jnp.array([1, 4])
  algo = algorithms.fednova.create()
  new, _ = algorithms.server_update(algo, g, algo.server_optimizer.init(g), c, p, tau)
  # d_1 = (1, 0)/1, d_2 = (0, 2)/4; tau_eff = 0.25 + 3 = 3.25;
  # w = g - 3.25 * (0.25 * (1, 0) + 0.75 * (0, 0.5)) = (1 - 0.8125, 2 - 1.21875)
  np.testing.assert_allclose(new["w"], [0.1875, 0.78125], atol=1e-12)


def test_fedavgm_momentum_by_hand(x64):
  g = {"w": jnp.array([1.0])}
  algo = algorithms.fedavgm.create(0.5, server_lr=1.0)
  state = algo.server_optimizer.init(g)
  w = jnp.array([1.0])
  g1, state = algorithms.server_update(algo, g, state, {"w": jnp.array([[0.0]])}, w, jnp.array([1]))
  np.testing.assert_allclose(g1["w"], [0.0])  # v = 1
  g2, _ = algorithms.server_update(algo, g1, state, {"w": jnp.array([[0.0]])}, w, jnp.array([1]))
  np.testing.assert_allclose(g2["w"], [-0.5])  # v = 0.5 * 1 + 0


def test_batch_plan_covers_each_example_once_per_epoch():
  plan = client.make_batch_plan(11, 20, 3, 4, np.random.default_rng(0))
  assert plan.idx.shape == (15, 4) and plan.active.sum() == 9
  per_epoch = plan.idx.reshape(3, 5, 4)
  w = plan.weight.reshape(3, 5, 4)
  for e in range(3):
    seen = per_epoch[e][w[e] > 0]
    assert sorted(seen.tolist()) == list(range(11))
  with pytest.raises(ValueError, match="no examples"):
    client.make_batch_plan(0, 20, 1, 4, np.random.default_rng(0))


@pytest.mark.parametrize("seed, num_clients, per_round", [(4, 20, 8), (7, 20, 8), (0, 10, 3)])
def test_sample_clients_is_creff_sequence_and_resumable(seed, num_clients, per_round):
  """CReFF: one RandomState(seed), ``choice(range(K), m, replace=False)`` every round, unsorted."""
  rs = np.random.RandomState(seed)
  seq = [rs.choice(range(num_clients), per_round, replace=False) for _ in range(6)]
  assert any(np.any(np.diff(x) < 0) for x in seq)  # the draw order is not sorted
  for r in range(6):
    got = rounds.sample_clients(seed, r, num_clients, per_round)
    assert got.tolist() == seq[r].tolist()


def test_second_round_compiles_nothing(x64):
  """Fixed shapes: a new round (other clients, plans, keys, weights) reuses the executable.

  Public checks only: ``chex.assert_max_traces`` on the local training (a retrace of the round
  traces it again) and a ``jax.monitoring`` listener on XLA backend compilations (a recompile
  without a retrace, e.g. for other input shardings, still compiles).
  """
  model, images, labels, variables = _setup()
  algo = algorithms.fedavg.create()
  mesh = sharding.create_client_mesh(1)
  trainer = _trainer(model, algo)
  trainer = trainer._replace(train=chex.assert_max_traces(trainer.train, n=1))
  fn = rounds.create_round_fn(trainer, algo, mesh, "vmap")
  state = jax.device_put(algo.server_optimizer.init(variables["params"]), sharding.replicated(mesh))
  v = jax.device_put(variables, sharding.replicated(mesh))  # as federate.run places the state
  all_inputs = [
    _inputs(images, labels, sel, pad_to=2, round_index=r)[0]
    for r, sel in enumerate(([0, 1], [1, 2], [0, 2]))
  ]
  compiles = []

  def on_event(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  v, state, _ = fn(v, state, all_inputs[0])
  jax.block_until_ready(v)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    for inputs in all_inputs[1:]:
      v, state, _ = fn(v, state, inputs)
    jax.block_until_ready(v)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert compiles == []


def test_round_weights_are_client_sizes():
  """FedAvg's weights |D_k| / sum |D_k| in draw order; padding clients weigh 0."""
  inputs, ids = rounds.build_round_inputs(
    [2, 0, 1],
    SIZES,
    int(SIZES.max()),
    epochs=1,
    batch_size=BATCH,
    seed=0,
    round_index=0,
    pad_to=5,
    aug_key=jax.random.PRNGKey(0),
  )
  np.testing.assert_allclose(inputs.weights, [8 / 24, 11 / 24, 5 / 24, 0, 0], atol=1e-15)
  assert ids[:3].tolist() == [2, 0, 1]
  assert not np.asarray(inputs.plan.active[3:]).any()


def _hand_sgd_step(model, params, batch_stats, images_u8, labels, global_params, mu):
  """Plain SGD on the mean cross-entropy plus mu * (w - w_g): jax.grad and a hand update.

  Normalisation by hand in float64, no augmentation, train-mode BN over the whole batch.
  """
  x = (np.asarray(images_u8, np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
  y = np.asarray(labels)

  def ce(p):
    out, new = model.apply(
      {"params": p, "batch_stats": batch_stats}, jnp.asarray(x), train=True, mutable=["batch_stats"]
    )
    logp = jax.nn.log_softmax(out["logits"])
    return -jnp.mean(logp[jnp.arange(len(y)), y]), new["batch_stats"]

  (loss, stats), g = jax.value_and_grad(ce, has_aux=True)(params)
  new = jax.tree.map(lambda w, gw, wg: w - LR * (gw + mu * (w - wg)), params, g, global_params)
  return new, stats, loss


def _plain_trainer(model, algo):
  return client.create_local_trainer(
    model,
    algo,
    learning_rate=LR,
    mean=MEAN,
    std=STD,
    crop_padding=0,
    flip=False,
    per_batch_augment=False,
  )


@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_fedprox_step_closed_form(x64, mu):
  """One FedProx step from w != w_g: ``w - lr * (grad F(w) + mu * (w - w_g))`` (prox mu/2)."""
  model, images, labels, variables = _setup()
  trainer = _plain_trainer(model, algorithms.fedprox.create(mu))
  global_params = variables["params"]
  noise = jax.random.PRNGKey(11)
  leaves, tree = jax.tree.flatten(global_params)
  keys = jax.random.split(noise, len(leaves))
  start = jax.tree.unflatten(
    tree, [w + 0.05 * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys)]
  )
  carry = trainer.init_carry({"params": start, "batch_stats": variables["batch_stats"]})
  idx = jnp.array([3, 1, 7, 0, 9])
  (params, stats, _), loss = trainer.step(
    carry,
    jnp.asarray(images[0]),
    jnp.asarray(labels[0]),
    global_params,
    idx,
    jnp.ones(5),
    True,
    jax.random.PRNGKey(0),
  )
  want, want_stats, want_ce = _hand_sgd_step(
    model,
    start,
    variables["batch_stats"],
    images[0][np.asarray(idx)],
    labels[0][np.asarray(idx)],
    global_params,
    mu,
  )
  _assert_close(params, want, 1e-10)
  _assert_close(stats, want_stats, 1e-10)
  sq = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(start), leaves))
  np.testing.assert_allclose(loss, float(want_ce) + 0.5 * mu * sq, atol=1e-10)
  if mu:  # the proximal pull is really in there
    plain = _hand_sgd_step(
      model,
      start,
      variables["batch_stats"],
      images[0][np.asarray(idx)],
      labels[0][np.asarray(idx)],
      global_params,
      0.0,
    )[0]
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, (want, plain))))
    assert diff > 1e-4


def test_fedavg_one_client_one_step_is_plain_sgd(x64):
  """A round of one client with one local step: the server model is that client's SGD step."""
  model, images, labels, variables = _setup()
  algo = algorithms.fedavg.create()
  trainer = _plain_trainer(model, algo)
  sizes = np.array([BATCH])
  inputs, _ = rounds.build_round_inputs(
    [0],
    sizes,
    BATCH,
    epochs=1,
    batch_size=BATCH,
    seed=0,
    round_index=0,
    pad_to=1,
    aug_key=jax.random.PRNGKey(0),
  )
  assert int(inputs.plan.active.sum()) == 1
  inputs = inputs._replace(
    images=jnp.asarray(images[:1, :BATCH]),
    labels=jnp.asarray(labels[:1, :BATCH]),
    weights=jnp.asarray(inputs.weights),
  )
  fn = rounds.create_round_fn(trainer, algo, sharding.create_client_mesh(1), "vmap")
  v = jax.tree.map(jnp.array, variables)
  new, _, metrics = fn(v, algo.server_optimizer.init(v["params"]), inputs)
  # BN statistics and the mean loss do not depend on the batch order: use all BATCH examples.
  want, want_stats, want_loss = _hand_sgd_step(
    model,
    variables["params"],
    variables["batch_stats"],
    images[0, :BATCH],
    labels[0, :BATCH],
    variables["params"],
    0.0,
  )
  _assert_close(new["params"], want, 1e-10)
  _assert_close(new["batch_stats"], want_stats, 1e-10)
  np.testing.assert_allclose(metrics["train/loss"], want_loss, atol=1e-10)


@pytest.mark.skipif(not onednn_conv.available(), reason=onednn_conv.unavailable_reason())
@pytest.mark.parametrize("strategy, devices", [("map", 1), ("vmap", 1), ("map", 2)])
def test_onednn_round_equals_per_client_loop_in_float32(strategy, devices):
  """``conv_impl="onednn"`` (float32 only) inside the whole round: scanned local steps, padded
  and masked batches, ``map`` / ``vmap`` over clients, ``shard_map`` over 1 or 2 devices, the
  same as the plain per-client loop to float32 rounding (the padded batches add zero rows to
  the kernel gradients' sums, so the two differ in summation order)."""
  model, images, labels, variables = _setup("float32", "onednn")
  algo = algorithms.fedavg.create()
  trainer = _trainer(model, algo)
  mesh = sharding.create_client_mesh(devices)
  inputs, ids = _inputs(images, labels, [0, 1, 2], pad_to=4)
  round_fn = rounds.create_round_fn(trainer, algo, mesh, strategy)
  copy = jax.tree.map(jnp.array, variables)
  new, _, _ = round_fn(copy, algo.server_optimizer.init(variables["params"]), inputs)
  expected = _loop_round(trainer, variables, images, labels, inputs, ids, 3)
  _assert_close(new, expected, 1e-5)  # measured 1.2e-7; uniform FedAvg weights: 4e-2
