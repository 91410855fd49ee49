"""The ``chunked`` client strategy: sorted, chunked, only active steps = the plain round.

Whole rounds in float64 (DESIGN.md: float32 BN training drifts, float64 agrees to ~1e-15).
Mutations watched failing while writing these (then reverted):
* outputs not put back in the input order (``x[inverse]`` dropped in ``rounds._chunked``):
  ``test_chunked_round_equals_vmap_round_and_per_client_loop`` fails (each client's FedAvg
  weight lands on another client's model) and so does ``test_chunks_run_their_longest_clients_steps``;
* a chunk running its shortest client's steps (``jnp.min`` for ``jnp.max``): both fail (the
  longer clients stop early);
* the filler slots of the last chunk counted in its trip count (``jnp.where(ok, ...)`` dropped):
  ``test_chunks_run_their_longest_clients_steps`` fails (results stay equal: extra iterations
  are masked no-ops, so only the cost test can see it).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedllava import algorithms, sharding
from fedllava.federate import client, rounds
from fedllava.models import resnet

# Unequal clients (1 to 14 examples; batch 4: 1 to 4 steps an epoch), not in size order.
SIZES = np.array([11, 5, 8, 3, 14, 1, 9])
BATCH, EPOCHS, LR = 4, 2, 0.1
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _setup():
  cfg = ml_collections.ConfigDict(dict(name="resnet8", width=4, dtype="float64", conv_impl="auto"))
  model = resnet.create_model(cfg, num_classes=3)
  rng = np.random.default_rng(0)
  n_max = int(SIZES.max())
  images = rng.integers(0, 256, (len(SIZES), n_max, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (len(SIZES), n_max)).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  variables = jax.tree.map(lambda x: x.astype("float64"), variables)
  variables["batch_stats"] = jax.tree.map(lambda x: x + 0.1, variables["batch_stats"])
  trainer = client.create_local_trainer(
    model,
    algorithms.fedavg.create(),
    learning_rate=LR,
    mean=MEAN,
    std=STD,
    crop_padding=1,
    flip=True,
    per_batch_augment=False,
  )
  return trainer, images, labels, variables


def _inputs(images, labels, selected, pad_to):
  inputs, ids = rounds.build_round_inputs(
    selected,
    SIZES,
    int(SIZES.max()),
    epochs=EPOCHS,
    batch_size=BATCH,
    seed=3,
    round_index=0,
    pad_to=pad_to,
    aug_key=jax.random.PRNGKey(7),
  )
  inputs = inputs._replace(
    images=jnp.asarray(images[ids]),
    labels=jnp.asarray(labels[ids]),
    weights=jnp.asarray(inputs.weights),
  )
  return inputs, ids


def _loop_round(trainer, variables, images, labels, inputs, ids, n_real):
  """The oracle: each client alone, only its real steps, unpadded partial batches."""
  step = jax.jit(trainer.step)
  results = []
  for c in range(n_real):
    carry = trainer.init_carry(variables)
    for s in np.nonzero(np.asarray(inputs.plan.active[c]))[0]:
      m = int(inputs.plan.weight[c, s].sum())
      carry, _ = step(
        carry,
        jnp.asarray(images[ids[c]]),
        jnp.asarray(labels[ids[c]]),
        variables["params"],
        jnp.asarray(inputs.plan.idx[c, s, :m]),
        jnp.ones(m, jnp.float64),
        True,
        jax.random.fold_in(inputs.keys[c], int(s)),
      )
    results.append({"params": carry[0], "batch_stats": carry[1]})
  n = SIZES[np.asarray(ids[:n_real])].astype(np.float64)
  w = n / n.sum()  # FedAvg's weights from the test's own sizes
  return jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *results)


def _assert_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def _round(trainer, variables, inputs, strategy, group_size=1, devices=1):
  algo = algorithms.fedavg.create()
  fn = rounds.create_round_fn(
    trainer, algo, sharding.create_client_mesh(devices), strategy, group_size
  )
  v = jax.tree.map(jnp.array, variables)
  return fn(v, algo.server_optimizer.init(v["params"]), inputs), fn


@pytest.mark.parametrize("group_size, devices", [(3, 1), (2, 2)])
def test_chunked_round_equals_vmap_round_and_per_client_loop(x64, group_size, devices):
  """7 unequal clients in draw order (not size order) + 1 padding client; chunks of 3 leave a
  filler slot (8 = 3 + 3 + 2), chunks of 2 on 2 devices split 4 clients per device."""
  trainer, images, labels, variables = _setup()
  selected = [2, 0, 6, 5, 4, 1, 3]
  inputs, ids = _inputs(images, labels, selected, pad_to=8)
  (new, _, m), _ = _round(trainer, variables, inputs, "chunked", group_size, devices)
  (ref, _, m_ref), _ = _round(trainer, variables, inputs, "vmap")
  _assert_close(new, ref, 1e-12)
  _assert_close(new, _loop_round(trainer, variables, images, labels, inputs, ids, 7), 1e-12)
  want_steps = [EPOCHS * -(-int(SIZES[c]) // BATCH) for c in selected] + [0]
  np.testing.assert_array_equal(m["train/client_steps"], want_steps)
  np.testing.assert_allclose(m["train/client_loss"], m_ref["train/client_loss"], atol=1e-12)
  np.testing.assert_allclose(m["train/loss"], m_ref["train/loss"], atol=1e-12)


def test_auto_group_size_runs_and_reports(x64):
  """``group_size=0``: chosen at the first call from the shapes and the memory; same result."""
  trainer, images, labels, variables = _setup()
  inputs, _ = _inputs(images, labels, [2, 0, 6, 5, 4, 1, 3], pad_to=7)
  (new, _, _), fn = _round(trainer, variables, inputs, "chunked", 0)
  (ref, _, _), _ = _round(trainer, variables, inputs, "vmap")
  _assert_close(new, ref, 1e-12)
  info = fn.info
  assert info["group_size"] == 1  # a CPU: one client per chunk (grouped convolutions are slow)
  assert info["per_client_bytes"] > 0 and info["budget_bytes"] > 0
  # A budget with room for exactly 2 clients' chunks: 2 clients per chunk, 4 chunks.
  fake = int((info["fixed_bytes"] + 2.5 * info["per_client_bytes"]) / rounds.MEMORY_FRACTION)
  message = None
  got = rounds.auto_group_size(
    trainer, variables, message, inputs, 1, budget=(fake, "fake"), platform="gpu"
  )
  assert got["group_size"] == 2 and got["budget_source"] == "fake"


def test_choose_group_size_with_a_fake_budget():
  mib = 2**20
  # 100 MiB free, half usable, 10 MiB fixed: 40 MiB for 1-MiB clients -> 40, evened over 1000
  # clients: ceil(1000 / 25) = 40.
  assert rounds.choose_group_size(1000, mib, 10 * mib, 100 * mib) == 40
  # 45 fit; 1000 clients need 23 chunks of 44 (the last not mostly filler).
  assert rounds.choose_group_size(1000, mib, 5 * mib, 100 * mib) == 44
  # Everything fits: one chunk of all clients.
  assert rounds.choose_group_size(8, mib, 0, 100 * mib) == 8
  # Nothing fits: one client at a time (the map strategy's memory), never 0.
  assert rounds.choose_group_size(8, 100 * mib, 0, 10 * mib) == 1
  assert rounds.choose_group_size(8, mib, 200 * mib, 100 * mib) == 1
  # The group strategy needs a divisor of the clients per device: 12 clients, 5 fit -> 4.
  assert rounds.choose_group_size(12, mib, 0, 10 * mib, divisor=True) == 4
  assert rounds.choose_group_size(12, mib, 0, 10 * mib) == 4  # 3 chunks of 4 (not 5 + 5 + 2)
  # The time model: 10 clients of 5 steps, 90 of 1, saturation 1 client. Sorted chunks of 10
  # cost (1 + 10) x (5 + 9 x 1) = 154, less than 1 (2 x 140 = 280), 5 (6 x 28 = 168), 20
  # (21 x 9 = 189) or one chunk of 100 (101 x 5 = 505).
  steps = np.array([1] * 45 + [5] * 10 + [1] * 45)
  assert rounds.choose_group_size(100, mib, 0, 1000 * mib, steps=steps, saturation=1.0) == 10
  # A device busy only from 64 clients on: 2 chunks of 50, (64 + 50) x (5 + 1) = 684, beat
  # one chunk of 100, 164 x 5 = 820, and chunks of 10, 74 x 14 = 1036.
  assert rounds.choose_group_size(100, mib, 0, 1000 * mib, steps=steps, saturation=64.0) == 50
  assert rounds.choose_group_size(100, mib, 0, 1000 * mib, steps=steps, saturation=1e4) == 100
  # ... unless memory stops it at 30: ceil(100 / 4) = 25.
  assert rounds.choose_group_size(100, mib, 0, 60 * mib, steps=steps, saturation=64.0) == 25


def test_chunks_run_their_longest_clients_steps():
  """With a stand-in local training that reports its trip count and client: each chunk of
  sorted clients runs its longest client's active steps, and outputs come back in input order."""
  steps = np.array([2, 7, 0, 5, 5, 1, 3])  # active steps per client, unsorted; one padding
  slots = 8
  active = np.arange(slots)[None, :] < steps[:, None]
  plan = client.BatchPlan(
    np.zeros((7, slots, 2), np.int32), np.ones((7, slots, 2), np.float32), active
  )
  images = jnp.arange(7, dtype=jnp.float32)[:, None]  # client c's "data" is c

  def fake_train(v, im, lb, pl, k, msg, n, sd, num_iters=None):
    return {"client": im[0], "trips": num_iters, "steps": jnp.sum(pl.active)}

  xs = (images, jnp.zeros((7, 1)), plan, jnp.zeros((7, 2), jnp.uint32), None, None)
  out = jax.jit(lambda xs: rounds._chunked(fake_train, None, None, xs, 3))(xs)
  np.testing.assert_array_equal(out["client"], np.arange(7))  # input order
  np.testing.assert_array_equal(out["steps"], steps)
  # Sorted by steps, longest first (stable): clients [1, 3, 4 | 6, 0, 5 | 2 + 2 fillers]
  # -> chunk trips 7, 3, 0.
  np.testing.assert_array_equal(out["trips"], [3, 7, 0, 7, 7, 3, 3])


def test_active_steps_loop_equals_the_scan(x64):
  """``train(num_iters=n)`` over the active slots only = the scan over every slot, for any
  n >= the client's active steps (extra iterations are masked no-ops)."""
  trainer, images, labels, variables = _setup()
  inputs, _ = _inputs(images, labels, [0], pad_to=1)
  plan = jax.tree.map(lambda x: jnp.asarray(x[0]), inputs.plan)
  args = (variables, jnp.asarray(images[0]), jnp.asarray(labels[0]), plan, inputs.keys[0])
  ref, m_ref = jax.jit(trainer.train)(*args)
  n = int(np.asarray(plan.active).sum())
  for trips in (n, n + 3):
    got, m = jax.jit(lambda *a, t=trips: trainer.train(*a, num_iters=t))(*args)
    _assert_close(got, ref, 1e-12)
    np.testing.assert_allclose(m["loss"], m_ref["loss"], atol=1e-12)
  short, _ = jax.jit(lambda *a: trainer.train(*a, num_iters=n - 1))(*args)
  assert not np.allclose(
    short["params"]["classifier"]["kernel"], ref["params"]["classifier"]["kernel"]
  )


def test_federate_stage_runs_chunked_with_auto_group_size(tmp_path, capsys):
  """The round loop with ``client_parallelism="chunked"`` and ``group_size=0`` (auto) runs and
  says which chunk size it chose and from what memory figure."""
  from conftest import tiny_digits

  from fedllava import main

  cfg = tiny_digits(1, **{"stages": "federate", "fl.client_parallelism": "chunked"})
  assert cfg.fl.group_size == 0  # the default is auto
  out = main.run(cfg, str(tmp_path / "run"))["federate"]
  assert np.isfinite(out.report["final"]["top1"])
  cap = capsys.readouterr()
  assert "[fl] group_size auto:" in cap.out + cap.err


def test_sample_clients_memo_equals_a_fresh_replay():
  """The sampler continues from its last call; any other order (a resume, a test) replays."""
  fresh = []
  for r in (0, 1, 2, 5, 9):
    rs = np.random.RandomState(11)
    for _ in range(r):
      rs.choice(range(50), 7, replace=False)
    fresh.append(rs.choice(range(50), 7, replace=False).tolist())
  for order in ((0, 1, 2, 5, 9), (9, 2, 5, 0, 1)):
    got = {r: rounds.sample_clients(11, r, 50, 7).tolist() for r in order}
    assert [got[r] for r in (0, 1, 2, 5, 9)] == fresh
