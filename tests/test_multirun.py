"""Several seeds as one program (fedllava/federate/multirun.py): each run equals the run alone.

float64 oracles (DESIGN.md): ``run_many`` of 2 seeds against ``loop.run`` of each seed alone:
final variables, server state, every round's metrics and the report, on the tiny digits config.
"""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_digits

from fedllava import algorithms, checkpoint, errors
from fedllava.federate import loop, multirun, rounds
from fedllava.models import resnet

SEEDS = (0, 1)


def _configs(rounds_=2, seeds=SEEDS, **over):
  return [tiny_digits(rounds_, **{"model.dtype": "float64", "seed": s, **over}) for s in seeds]


def _server_state(cfg, workdir):
  like = resnet.create_model(cfg.model, 10).init(
    jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32)
  )
  like = jax.tree.map(lambda x: x.astype(np.float64), like)
  server = algorithms.base.init_server_state(
    algorithms.create(cfg.fl), like, 10, jax.random.PRNGKey(0)
  )
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 2)
  try:
    return ck.restore_latest({"variables": like, "server_state": server})[1]["server_state"]
  finally:
    ck.close()


def _metrics(workdir):
  rows = [json.loads(s) for s in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]
  return [
    {k: v for k, v in r.items() if k != "wall_time" and not k.startswith("time/")} for r in rows
  ]


def _report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def assert_same_run(cfg, a_dir, a, b_dir, b, rtol=1e-12):
  """Run ``b`` (in ``b_dir``) equals run ``a``: variables, server state, metrics, report, to
  float64 rounding (``rtol``; 0: bit for bit). A batched (vmapped) convolution may round
  differently from the unbatched one, so runs vmapped together agree to ~1e-16 relative."""

  def same(x, y):
    if rtol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-15)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables), strict=True):
    same(x, y)
  sa, sb = _server_state(cfg, a_dir), _server_state(cfg, b_dir)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
    same(x, y)
  ma, mb = _metrics(a_dir), _metrics(b_dir)
  assert [sorted(r) for r in ma] == [sorted(r) for r in mb]
  for ra, rb in zip(ma, mb):
    assert ra == pytest.approx(rb, rel=rtol, abs=1e-12 if rtol else 0)
  ra, rb = _report(a_dir), _report(b_dir)
  assert ra["final"]["top1"] == rb["final"]["top1"] and ra["curve"] == rb["curve"]
  assert json.dumps(ra, sort_keys=True) == json.dumps(rb, sort_keys=True) or rtol
  assert sorted(os.listdir(a_dir)) == sorted(os.listdir(b_dir))


@pytest.mark.parametrize(
  "algorithm, extra",
  [
    ("fedavg", {}),
    ("fedavgm", {}),
    ("ccvr", {"fl.ccvr.num_virtual": 8}),
    ("fedavg", {"data.partition": "dirichlet", "fl.local_epochs": 2}),
    (
      "fedavg",
      {
        "data.partition": "dirichlet",
        "fl.local_epochs": 2,
        "fl.client_parallelism": "chunked",
        "fl.group_size": 0,
      },
    ),
  ],
  ids=["fedavg", "fedavgm", "ccvr", "padded", "chunked_auto"],
)
def test_run_many_equals_each_run_alone(tmp_path, x64, algorithm, extra):
  """Two seeds in one program end exactly where each ends alone (float64: bit for bit here).

  ``fedavgm`` has server momentum (optax state), ``ccvr`` client uploads, a method state and a
  server step; ``padded``: Dirichlet client sizes, so the seeds' client stores have different
  padded lengths (83 vs 60 images) and batch plans (6 vs 4 steps): padding changes nothing;
  ``chunked_auto``: the same with the ``chunked`` strategy and its automatic chunk size (chosen
  from lane 0's shapes under a run axis).
  Catches: one aggregation over all runs' clients instead of per run, a lane handed to the
  wrong run, padding that shifts a step or its augmentation key, a server state shared."""
  cfgs = _configs(**{"fl.algorithm": algorithm, **extra})
  alone = [str(tmp_path / f"alone{c.seed}") for c in cfgs]
  many = [str(tmp_path / f"many{c.seed}") for c in cfgs]
  want = [loop.run(c, d) for c, d in zip(cfgs, alone)]
  lockstep = multirun._Lockstep(len(cfgs))
  got = multirun.run_many(cfgs, many, lockstep=lockstep)
  assert lockstep.calls == cfgs[0].fl.rounds  # one computation a round for both runs
  for c, a_dir, a, b_dir, b in zip(cfgs, alone, want, many, got):
    assert_same_run(c, a_dir, a, b_dir, b)
  assert want[0].report["final"] != want[1].report["final"]  # the seeds do differ


def test_killed_run_many_resumes_each_run_to_the_same_state(tmp_path, monkeypatch, x64):
  """Killed with seed 0 saved at round 2 and seed 1 at round 1, a rerun resumes each from its
  own checkpoint (the two runs then share rounds at different indices) and ends bit-identical
  to an uninterrupted ``run_many``."""
  cfgs = _configs(3, **{"fl.algorithm": "ccvr", "fl.ccvr.num_virtual": 8})
  straight_dirs = [str(tmp_path / f"a{c.seed}") for c in cfgs]
  straight = multirun.run_many(cfgs, straight_dirs)
  real = rounds.sample_clients

  def kill(seed, r, *a):
    if r == 2 - seed:
      raise KeyboardInterrupt("simulated kill")
    return real(seed, r, *a)

  dirs = [str(tmp_path / f"b{c.seed}") for c in cfgs]
  monkeypatch.setattr(rounds, "sample_clients", kill)
  with pytest.raises(KeyboardInterrupt):
    multirun.run_many(cfgs, dirs)
  monkeypatch.setattr(rounds, "sample_clients", real)
  assert sorted(os.listdir(os.path.join(dirs[0], "checkpoints"))) == ["1", "2"]
  assert sorted(os.listdir(os.path.join(dirs[1], "checkpoints"))) == ["1"]
  resumed = multirun.run_many(cfgs, dirs)
  for c, a_dir, a, b_dir, b in zip(cfgs, straight_dirs, straight, dirs, resumed):
    assert_same_run(c, a_dir, a, b_dir, b, rtol=0)  # the same program: bit for bit


def test_a_diverging_run_stops_alone_and_the_others_complete(tmp_path, monkeypatch, x64):
  """Seed 1's round 2 gets NaN aggregation weights: it stops with DivergedError and keeps its
  round-1 checkpoint; seed 0 completes and equals its run alone."""
  cfgs = _configs(3)
  real = rounds.build_round_inputs

  def poisoned(*a, **kw):
    inputs, ids = real(*a, **kw)
    if kw["seed"] == 1 and kw["round_index"] == 1:
      inputs = inputs._replace(weights=inputs.weights * np.nan)
    return inputs, ids

  alone = loop.run(cfgs[0], str(tmp_path / "alone0"))
  monkeypatch.setattr(rounds, "build_round_inputs", poisoned)
  dirs = [str(tmp_path / f"many{c.seed}") for c in cfgs]
  out = multirun.run_many(cfgs, dirs, return_exceptions=True)
  assert isinstance(out[1], errors.DivergedError) and "round 2" in str(out[1])
  assert sorted(os.listdir(os.path.join(dirs[1], "checkpoints"))) == ["1"]
  assert_same_run(cfgs[0], str(tmp_path / "alone0"), alone, dirs[0], out[0])
  with pytest.raises(errors.DivergedError, match="round 2"):
    multirun.run_many(cfgs, [str(tmp_path / f"again{c.seed}") for c in cfgs])


def test_configs_that_differ_beyond_the_seed_are_refused(tmp_path):
  cfgs = [tiny_digits(1, seed=0), tiny_digits(1, seed=1, **{"fl.learning_rate": 0.2})]
  with pytest.raises(errors.ConfigError, match=r"differ in \['fl'\]"):
    multirun.run_many(cfgs, [str(tmp_path / "a"), str(tmp_path / "b")])
  with pytest.raises(errors.ConfigError, match="given twice"):
    multirun.run_many(cfgs[:1] * 2, [str(tmp_path / "a")] * 2)
  assert not os.listdir(tmp_path)
