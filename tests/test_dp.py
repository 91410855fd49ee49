"""Client-level DP (fedllava/privacy.py): the mechanism's oracles (clip, uniform sum, noise,
fixed denominator, adaptive clip), the accountant against a published epsilon and a closed
form, the refusals, and the budget stop end to end. Expected values are computed here (numpy,
or dp_accounting called directly), never read back from the module under test."""

import json
import math

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits
from dp_accounting import rdp
from test_methods import _setup

from fedllava import accounting, algorithms, errors, main, privacy, sharding
from fedllava.algorithms import base, fedavg, fednova
from fedllava.federate import rounds


def _tree(rng, m, dtype=np.float64):
  """A global model and ``m`` stacked client models shaped like ours (params + BN stats)."""
  g = {
    "params": {"a": rng.normal(size=(3,)), "b": rng.normal(size=(2, 2))},
    "batch_stats": {"bn": {"mean": rng.normal(size=(2,)), "var": 5 + rng.random(2)}},
  }
  c = jax.tree.map(lambda x: x[None] + rng.normal(size=(m,) + x.shape), g)
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
  return cast(g), cast(c)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _aggregate(settings, g, c, weights, key=0, clip=None):
  state = {"dp": {"clip": jnp.asarray(settings.clip_norm if clip is None else clip, jnp.float64)}}
  ctx = base.AggregateContext(g, c, jnp.asarray(weights), jnp.ones(len(weights)), state,
                              jax.random.PRNGKey(key))  # fmt: skip
  return jax.jit(privacy.dp_aggregate(settings))(ctx)


def test_clipped_update_is_within_c_and_unchanged_below_c(x64):
  """Mutations caught: clipping each leaf on its own (not the whole update), clipping updates
  already below C, scaling by C / ||x|| without the min(1, .)."""
  rng = np.random.default_rng(0)
  for scale in (0.1, 1.0, 10.0):
    tree = {"a": rng.normal(size=(5,)) * scale, "b": {"c": rng.normal(size=(3, 2)) * scale}}
    x = _flat(tree)
    want = x * min(1.0, 2.0 / np.linalg.norm(x))
    got, norm = privacy.clip(jax.tree.map(jnp.asarray, tree), 2.0)
    np.testing.assert_allclose(_flat(got), want, rtol=1e-12, atol=0)
    assert np.linalg.norm(_flat(got)) <= 2.0 * (1 + 1e-12)
    np.testing.assert_allclose(float(norm), np.linalg.norm(x), rtol=1e-12)
    if np.linalg.norm(x) <= 2.0:
      np.testing.assert_array_equal(_flat(got), x)


def test_noiseless_aggregate_is_the_uniform_mean_of_whole_clipped_updates(x64):
  """The numpy oracle of McMahan et al.'s f~_f with sigma = 0: every real client's whole update
  (BN statistics included) clipped, summed uniformly, divided by the fixed m; the padding
  client (weight 0) left out. Mutations caught: BN statistics outside the clip, size weights
  instead of the uniform sum, the padding client counted, dividing by the sum of weights."""
  rng = np.random.default_rng(1)
  g, c = _tree(rng, 4)
  weights = np.array([0.5, 0.3, 0.2, 0.0])  # size weights; the last is a padding client
  s = privacy.DPSettings(clip_norm=1.5, update_noise=0.0, denominator=3, noise_cohort_size=3)
  delta, stats, state, metrics = _aggregate(s, g, c, weights)
  d = np.stack([_flat(jax.tree.map(lambda x, y: x[k] - y, c, g)) for k in range(4)])
  norms = np.linalg.norm(d, axis=1)
  clipped = d * np.minimum(1.0, 1.5 / norms)[:, None]
  want = clipped[:3].sum(0) / 3  # real clients only, uniform, fixed denominator m = 3
  got = _flat({"batch_stats": jax.tree.map(lambda s_, g_: s_ - g_, stats, g["batch_stats"]),
               "params": jax.tree.map(jnp.negative, delta)})  # fmt: skip
  # _flat orders leaves as jax does (batch_stats before params): the same order as ``d``.
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  assert float(metrics["dp/clip"]) == 1.5 and state["dp"]["clip"] == 1.5


def test_noise_std_is_sigma_c_over_the_cohort(x64):
  """Zero updates, so the output is the noise alone: its empirical std over 40k draws matches
  z C (m / M) / m = z C / M within 5 standard errors (the sample std's relative standard error
  is 1 / sqrt(2 n)); two round keys give independent noise. Mutations caught: noise added after
  the division (std z C), noise_cohort_size scaling inverted, the same noise every round."""
  g = {"params": {"w": jnp.zeros((40_000,))}, "batch_stats": {"bn": {"mean": jnp.zeros((1,))}}}
  c = jax.tree.map(lambda x: jnp.stack([x, x, x]), g)
  for cohort in (3, 30):
    s = privacy.DPSettings(clip_norm=0.7, update_noise=1.3, denominator=3, noise_cohort_size=cohort)
    delta, *_ = _aggregate(s, g, c, np.ones(3) / 3, key=0)
    other, *_ = _aggregate(s, g, c, np.ones(3) / 3, key=1)
    x = np.asarray(delta["w"])
    want = 1.3 * 0.7 / cohort
    assert abs(x.std() / want - 1) < 5 / math.sqrt(2 * x.size)
    assert abs(x.mean()) < 5 * want / math.sqrt(x.size)
    assert abs(np.corrcoef(x, np.asarray(other["w"]))[0, 1]) < 5 / math.sqrt(x.size)


def test_adaptive_clip_moves_geometrically_towards_the_quantile(x64):
  """Andrew et al. Alg. 1 with sigma_b = 0: C' = C exp(-eta (b - gamma)), b the fraction of the
  m clients with ||Delta_k|| <= C, computed in numpy. Mutations caught: the sign of the step
  (C growing while most clients are unclipped), counting clipped instead of unclipped clients,
  dividing by the real clients counted instead of m."""
  rng = np.random.default_rng(2)
  g, c = _tree(rng, 5)
  d = np.stack([_flat(jax.tree.map(lambda x, y: x[k] - y, c, g)) for k in range(5)])
  norms = np.linalg.norm(d, axis=1)
  clip = float(np.sort(norms)[3])  # 4 of 5 within C
  weights = np.array([0.25, 0.25, 0.25, 0.25, 0.0])  # the 5th is padding
  s = privacy.DPSettings(1.0, 0.0, 4, 4, adaptive_clip=True, target_quantile=0.3,
                         clip_learning_rate=0.2, count_noise=0.0)  # fmt: skip
  _, _, state, metrics = _aggregate(s, g, c, weights, clip=clip)
  b = np.sum(norms[:4] <= clip) / 4
  np.testing.assert_allclose(
    float(state["dp"]["clip"]), clip * np.exp(-0.2 * (b - 0.3)), rtol=1e-12
  )
  np.testing.assert_allclose(float(metrics["dp/unclipped_fraction"]), b, rtol=1e-12)


def _dp_round(algo, strategy, weights=None):
  _, trainer, variables, inputs = _setup(algo)
  if weights is not None:
    inputs = inputs._replace(weights=np.asarray(weights))
  state = base.init_server_state(algo, variables, 3, jax.random.PRNGKey(2))
  fn = rounds.create_round_fn(trainer, algo, sharding.create_client_mesh(1), strategy)
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
  return fn(copy(variables), copy(state), inputs, {"data": None, "key": jax.random.PRNGKey(3)})


def test_infinite_clip_and_no_noise_is_fedavg_with_uniform_weights_and_vmap_equals_map(x64):
  """A whole round in float64: clip = inf, sigma = 0, denominator m = 2 equals FedAvg with
  weights 1/2 on parameters and BN statistics; and a noisy, adaptive DP round is the same under
  vmap and map. Mutations caught: the size weights leaking into the DP mean, BN statistics
  left out of the DP aggregate, noise drawn per client-shard."""
  s = privacy.DPSettings(float("inf"), 0.0, 2, 2)
  dp = privacy.wrap(fedavg.create(), s)
  (va, _, ma) = _dp_round(dp, "vmap")
  (vb, _, _) = _dp_round(fedavg.create(), "vmap", weights=[0.5, 0.5])
  for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)
  noisy = privacy.wrap(fedavg.create(), privacy.DPSettings(0.5, 0.8, 2, 4, True, 0.5, 0.2, 0.1))
  (na, sa, _), (nb, sb, _) = _dp_round(noisy, "vmap"), _dp_round(noisy, "map")
  for x, y in zip(jax.tree.leaves((na, sa)), jax.tree.leaves((nb, sb)), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-10, rtol=0)
  assert float(sa["method"]["dp"]["clip"]) != 0.5  # the adaptive clip moved and is state


# ---- accounting ----
def test_epsilon_matches_tf_privacys_published_mnist_table():
  """TF Privacy, tutorials/README.md "Select Parameters" (DP-SGD on MNIST, q = 256 / 60000,
  delta = 1e-5, RDP accountant): z = 1.12 for 60 epochs -> eps 2.92; z = 1.2 for 10 epochs ->
  eps 1.20. The table used the classic RDP -> (eps, delta) conversion (Mironov 2017, Prop. 3:
  eps = min_a RDP(a) + log(1 / delta) / (a - 1)), applied here to our accountant's curve; the
  epsilon we report uses dp_accounting's tighter conversion, so it must not exceed it. (The
  table's 30-epoch row, 9.74, is 9.76 with this and with TF Privacy's own order list: an older
  accountant's number.) Mutations caught: q = m / N inverted, per-round RDP not multiplied by
  the rounds, the Poisson event replaced by a full-batch Gaussian."""
  for z, epochs, published in ((1.12, 60, 2.92), (1.2, 10, 1.20)):
    acc = accounting.Accountant(60_000, 256, z, 1e-5, accounting="poisson")
    steps = epochs * 60_000 // 256
    classic = np.min(acc.rdp_per_round * steps + math.log(1e5) / (acc.orders - 1))
    assert round(float(classic), 2) == published
    assert acc.epsilon(steps) <= classic


def test_without_replacement_accounting_uses_the_replace_one_sensitivity():
  """With m = N (q = 1) the subsampled Gaussian is the plain Gaussian, RDP(a) = a / (2 s^2), and
  under replace-one the clipped sum moves by 2C, so s = z / 2: RDP = 2 a / z^2 per round.
  Mutation caught: the replace-one factor 2 forgotten (epsilon 4x too small at q = 1)."""
  acc = accounting.Accountant(4, 4, 1.7, 1e-5)
  np.testing.assert_allclose(acc.rdp_per_round, 2 * acc.orders / 1.7**2, rtol=1e-10)


def _library_epsilon(n, m, z, delta, t):
  acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
  event = dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z / 2))
  acc.compose(dpa.SelfComposedDpEvent(event, t))
  return acc.get_epsilon(delta)


def test_target_epsilon_calibrates_the_noise_for_the_planned_rounds():
  """Mutations caught: calibrating for one round instead of config.fl.rounds, returning the
  lower end of the bisection (epsilon above the target)."""
  fl = tiny_digits(50, **{"fl.dp.enabled": True, "fl.dp.target_epsilon": 8.0}).fl
  z = accounting.noise_multiplier(fl)
  n, m = fl.num_clients, fl.clients_per_round
  assert _library_epsilon(n, m, z, 1e-5, 50) <= 8.0 < _library_epsilon(n, m, z * 0.995, 1e-5, 50)


def test_methods_the_wrapper_cannot_wrap_are_refused():
  """Mutation caught: a method with per-class uploads or FedNova's normalisation silently run
  under DP (its uploads or size-dependent steps would leak past the clip and the noise)."""
  s = privacy.DPSettings(1.0, 1.0, 2, 2)
  upload = fedavg.create()._replace(client_upload=lambda *a: {"statistics": jnp.zeros(3)})
  for algo, word in ((upload, "client_upload"), (fednova.create(), "FedNova"),
                     (fedavg.create()._replace(server_data="unlabeled"), "server data")):  # fmt: skip
    with pytest.raises(errors.ConfigError, match=word):
      privacy.wrap(algo, s)
  with pytest.raises(errors.ConfigError, match="fednova"):
    algorithms.create(tiny_digits(1, **{"fl.algorithm": "fednova", "fl.dp.enabled": True}).fl)
  with pytest.raises(errors.ConfigError, match="clip_norm"):
    algorithms.create(tiny_digits(1, **{"fl.dp.enabled": True, "fl.dp.clip_norm": 0.0}).fl)


def test_budget_stops_before_the_round_that_would_exceed_it(tmp_path):
  """End to end through main.run (the smoke test): a budget between epsilon(1) and epsilon(2)
  (dp_accounting called here) runs exactly one of three rounds, logs dp/epsilon = epsilon(1)
  and reports the stop. Mutations caught: stopping after the round that exceeds the budget,
  epsilon logged for the wrong number of rounds."""
  z, n, m = 1.0, 20, 4
  e1, e2 = (_library_epsilon(n, m, z, 1e-5, t) for t in (1, 2))
  cfg = tiny_digits(3, **{"stages": "federate", "fl.dp.enabled": True,
                          "fl.dp.epsilon_budget": (e1 + e2) / 2})  # fmt: skip
  out = main.run(cfg, str(tmp_path))["federate"]
  rows = [json.loads(s) for s in (tmp_path / "federate" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1]
  np.testing.assert_allclose(rows[0]["dp/epsilon"], e1, rtol=1e-9)
  assert "dp/clip" in rows[0]
  dp = out.report["dp"]
  assert dp["rounds_run"] == 1 and dp["stopped_by_budget"] is True
  np.testing.assert_allclose(dp["epsilon"], e1, rtol=1e-9)
  saved = json.loads((tmp_path / "federate" / "report.json").read_text())
  assert saved["dp"]["rounds_run"] == 1
