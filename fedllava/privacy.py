"""Client-level differential privacy: DP-FedAvg as a wrapper around a method's aggregation.

``wrap(algorithm, ...)`` returns the same method whose aggregation is McMahan et al.'s
DP-FedAvg (ICLR 2018, Alg. 1 with the fixed-denominator estimator ``f~_f``). Each sampled
client's whole update ``Delta_k = w_k - w`` (parameters and BN statistics: both leave the
client) is clipped to L2 norm ``C`` over the whole tree, the server sums the clipped updates
uniformly (size weights ``|D_k|`` would enter the sensitivity), adds Gaussian noise and divides
by the fixed expected cohort size ``m`` (``config.fl.clients_per_round``):

  Delta~_k = Delta_k * min(1, C / ||Delta_k||)
  Delta~   = (sum_k Delta~_k + N(0, (z_Delta C m / M)^2 I)) / m
  w       <- server_optimizer(w, -Delta~)          (FedAvg: w + Delta~)

``M`` is ``noise_cohort_size`` (pfl-research's option; ``M = m`` by default): the noise a
cohort of ``M`` clients would need, for simulating a larger deployment's noise-to-signal.
Everything runs inside the round's jit; the noise key is the round's server key, so a resumed
round draws the same noise.

Adaptive clipping (Andrew et al., NeurIPS 2021, Alg. 1): ``C`` is server state, moved
geometrically towards the ``gamma`` quantile of the update norms with a privately estimated
fraction of unclipped clients:

  b~ = (sum_k 1[||Delta_k|| <= C] + N(0, (sigma_b m / M)^2)) / m
  C <- C exp(-eta_C (b~ - gamma))

and the update's noise multiplier ``z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` keeps the total
privacy of both releases that of noise multiplier ``z`` (their Sec. 3.1).

Accounting (``Accountant``) uses Google's ``dp_accounting`` RDP accountant. Our sampler draws
``m`` of ``N`` clients without replacement (``rounds.sample_clients``): the library's
``SampledWithoutReplacementDpEvent`` (Wang, Balle, Kasiviswanathan 2019, Thm. 27) under the
replace-one relation, where swapping one client moves the clipped sum by up to ``2C`` (and the
centred count by 1), so each Gaussian's multiplier is halved relative to add/remove-one.
``accounting="poisson"`` reports the literature's convention instead (Poisson sampling at
``q = m / N``, add/remove-one, as McMahan et al. and TF Privacy): not exact for our sampler.

References:
  McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
  ICLR 2018, Alg. 1. Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
  Adaptive Clipping", NeurIPS 2021, Alg. 1, Sec. 3.1 (defaults as TFF's
  ``DifferentiallyPrivateFactory.gaussian_adaptive``). pfl-research's ``noise_cohort_size``
  (apple/pfl-research: ``parse_mechanism(..., cohort_size, noise_cohort_size)`` and the
  benchmarks' ``--noise_cohort_size``, whose help says results hold only for a real cohort of
  that size). dp_accounting 0.6
  (rdp/rdp_privacy_accountant.py:400, ``_compute_rdp_sample_wor_gaussian``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedllava import accounting, errors
from fedllava.algorithms import base

DP_KEY_TAG = 0x0D9  # folded into the round's server key: the DP noise's own stream
ACCOUNTING = accounting.ACCOUNTING


# ---- the mechanism (inside the round's jit) ----
def tree_norm(tree) -> jax.Array:
  """The L2 norm of a whole pytree (every leaf flattened together)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def clip(tree, clip_norm):
  """``(tree * min(1, C / ||tree||), ||tree||)``: unchanged when already within ``C``."""
  norm = tree_norm(tree)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
  return jax.tree.map(lambda x: x * scale.astype(x.dtype), tree), norm


def _noise_like(tree, key, std):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [
    std.astype(x.dtype) * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, noise)


def _clamp_variances(stats):
  """BN running variances stay >= 0 after noise (post-processing: costs no privacy)."""

  def leaf(path, x):
    last = path[-1]
    return jnp.maximum(x, 0.0) if getattr(last, "key", None) == "var" else x

  return jax.tree_util.tree_map_with_path(leaf, stats)


class DPSettings(NamedTuple):
  """The mechanism's numbers (``settings_from_config`` derives them from ``config.fl.dp``).

  Attributes:
    clip_norm: ``C`` (the initial clip with ``adaptive_clip``); ``inf`` clips nothing.
    update_noise: ``z_Delta``, the update's noise std over ``C`` (Andrew's ``z`` split).
    denominator: ``m``, the expected cohort size the noisy sum is divided by.
    noise_cohort_size: ``M``; noise stds are scaled by ``m / M``.
    adaptive_clip: whether ``C`` follows the ``target_quantile`` of the update norms.
    target_quantile: ``gamma``.
    clip_learning_rate: ``eta_C``.
    count_noise: ``sigma_b``, the std of the noise on the unclipped count.
  """

  clip_norm: float
  update_noise: float
  denominator: int
  noise_cohort_size: int
  adaptive_clip: bool = False
  target_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  count_noise: float = 0.0


def dp_aggregate(settings: DPSettings):
  """``aggregate`` (the contract's part): clip, uniform sum, noise, fixed denominator."""
  s = settings
  scale = s.denominator / s.noise_cohort_size

  def aggregate(ctx: base.AggregateContext):
    c = ctx.state["dp"]["clip"]
    deltas = jax.tree.map(lambda w, g: w - g[None], ctx.client_variables, ctx.variables)
    clipped, norms = jax.vmap(lambda d: clip(d, c))(deltas)
    real = (ctx.weights > 0).astype(norms.dtype)  # padding clients upload nothing
    total = jax.tree.map(lambda x: jnp.tensordot(real.astype(x.dtype), x, axes=1), clipped)
    key = jax.random.fold_in(ctx.key, DP_KEY_TAG)
    k_update, k_count = jax.random.split(key)
    if s.update_noise:  # (z = 0 adds nothing, also with C = inf)
      total = jax.tree.map(jnp.add, total, _noise_like(total, k_update, s.update_noise * c * scale))
    noisy = jax.tree.map(lambda t: t / s.denominator, total)
    pseudo_gradient = jax.tree.map(jnp.negative, noisy["params"])
    stats = _clamp_variances(
      jax.tree.map(lambda g, d: g + d, ctx.variables["batch_stats"], noisy["batch_stats"])
    )
    unclipped = jnp.sum(real * (norms <= c))
    metrics = {"dp/clip": c, "dp/update_norm_max": jnp.max(jnp.where(real > 0, norms, 0.0))}
    state = ctx.state
    if s.adaptive_clip:
      count = unclipped + s.count_noise * scale * jax.random.normal(k_count, (), norms.dtype)
      fraction = count / s.denominator
      new_clip = c * jnp.exp(-s.clip_learning_rate * (fraction - s.target_quantile))
      state = {**ctx.state, "dp": {"clip": new_clip.astype(c.dtype)}}
      metrics["dp/unclipped_fraction"] = fraction  # the noisy estimate: private
    return pseudo_gradient, stats, state, metrics

  return aggregate


# ---- which methods can be wrapped ----
def refusal(algorithm: base.FLAlgorithm) -> str | None:
  """Why DP-FedAvg cannot wrap ``algorithm`` (None when it can)."""
  if algorithm.client_upload is not None:
    return (
      "it uploads per-class statistics or gradients besides the model (client_upload); those "
      "need their own clipping and noise, which this wrapper does not give them"
    )
  if algorithm.server_data is not None:
    return "its server step reads every client's model (ensemble distillation on server data)"
  if algorithm.aggregate is not None:
    return "it has its own whole-model aggregation"
  if algorithm.pseudo_gradient is not base.mean_delta:
    return (
      "its aggregation is not FedAvg's mean (FedNova divides each update by its step count "
      "tau_k and rescales by tau_eff = sum_k p_k tau_k: both depend on the clients' data "
      "sizes, so the clipped sum's sensitivity argument does not cover it)"
    )
  return None


def wrap(algorithm: base.FLAlgorithm, settings: DPSettings) -> base.FLAlgorithm:
  """``algorithm`` with DP-FedAvg's aggregation; everything else (local loss and penalty, the
  server optimizer, message, evaluated model) is post-processing or local, and unchanged.

  The method's own server step, if any, sees only the released aggregate: its context holds
  no client models, uploads or weights.

  Raises:
    errors.ConfigError: for a method the wrapper cannot wrap (``refusal``).
  """
  why = refusal(algorithm)
  if why is not None:
    raise errors.ConfigError(
      f"config.fl.dp.enabled=True cannot wrap config.fl.algorithm={algorithm.name!r}: {why}. "
      "Use a method that aggregates with FedAvg's mean (fedavg, fedprox, fedavgm, fedadam, "
      "fedyogi, fedfocal, taunorm) or set config.fl.dp.enabled=False."
    )
  inner = algorithm

  def inner_state(state):
    return state.get("inner")

  def server_init(variables, num_classes, key):
    dtype = jax.tree.leaves(variables["params"])[0].dtype
    state = {"dp": {"clip": jnp.asarray(settings.clip_norm, dtype)}}
    if inner.server_init is not None:
      state["inner"] = inner.server_init(variables, num_classes, key)
    return state

  server_step = None
  if inner.server_step is not None:

    def server_step(ctx: base.ServerContext, model_fn):
      released = ctx._replace(
        state=inner_state(ctx.state), client_variables=None, uploads=None, weights=None
      )
      variables, state, metrics = inner.server_step(released, model_fn)
      return variables, {**ctx.state, "inner": state}, metrics

  def lift(fn):
    return None if fn is None else (lambda variables, state: fn(variables, inner_state(state)))

  return inner._replace(
    name=f"{inner.name}+dp",
    aggregate=dp_aggregate(settings),
    server_init=server_init,
    server_step=server_step,
    message=lift(inner.message),
    eval_variables=lift(inner.eval_variables),
  )


def settings_from_config(fl) -> DPSettings:
  dp = fl.dp
  z = accounting.noise_multiplier(fl)
  sigma_b = accounting.count_noise(fl)
  return DPSettings(
    clip_norm=float(dp.clip_norm),
    update_noise=accounting.update_noise_multiplier(z, sigma_b),
    denominator=int(fl.clients_per_round),
    noise_cohort_size=accounting.cohort(fl),
    adaptive_clip=bool(dp.adaptive_clip),
    target_quantile=float(dp.target_quantile),
    clip_learning_rate=float(dp.clip_learning_rate),
    count_noise=sigma_b,
  )


def apply(algorithm: base.FLAlgorithm, fl) -> base.FLAlgorithm:
  """``algorithm`` wrapped in DP-FedAvg when ``config.fl.dp.enabled`` (else unchanged)."""
  if not fl.dp.enabled:
    return algorithm
  validate(fl)
  return wrap(algorithm, settings_from_config(fl))


def validate(fl) -> None:
  """Checks ``config.fl.dp`` (only when enabled)."""
  dp = fl.dp
  if not dp.enabled:
    return

  def bad(field, why):
    raise errors.ConfigError(f"config.fl.dp.{field}={dp[field]!r} {why}")

  if not (dp.clip_norm > 0 and math.isfinite(dp.clip_norm)):
    bad("clip_norm", "must be a finite number > 0 (the L2 bound C on each client's update).")
  if not (dp.noise_multiplier >= 0 and math.isfinite(dp.noise_multiplier)):
    bad("noise_multiplier", "must be a finite number >= 0.")
  if not 0 < dp.delta < 1:
    bad("delta", "must be in (0, 1) (McMahan et al.: about 1 / N^1.1).")
  for field in ("target_epsilon", "epsilon_budget"):
    if not (dp[field] >= 0 and math.isfinite(dp[field])):
      bad(field, "must be a finite number >= 0 (0: off).")
  if dp.accounting not in ACCOUNTING:
    bad("accounting", f"must be one of {ACCOUNTING}.")
  if not 1 <= fl.clients_per_round <= fl.num_clients:
    raise errors.ConfigError(
      f"config.fl.clients_per_round={fl.clients_per_round} must be between 1 and "
      f"config.fl.num_clients={fl.num_clients}."
    )
  if dp.noise_cohort_size and dp.noise_cohort_size < fl.clients_per_round:
    bad("noise_cohort_size", f"must be 0 (off) or >= clients_per_round={fl.clients_per_round}.")
  if dp.adaptive_clip:
    if not 0 < dp.target_quantile < 1:
      bad("target_quantile", "must be in (0, 1) (Andrew et al.: 0.5).")
    if not dp.clip_learning_rate > 0:
      bad("clip_learning_rate", "must be > 0 (Andrew et al.: 0.2).")
    if dp.clipped_count_stddev < 0:
      bad("clipped_count_stddev", "must be >= 0 (0: Andrew et al.'s cohort / 20).")
    z, sb = accounting.noise_multiplier(fl), accounting.count_noise(fl)
    if z > 0 and not 2 * sb > z:
      raise errors.ConfigError(
        f"config.fl.dp: noise_multiplier={z:g} needs 2 * clipped_count_stddev > it "
        f"(got {2 * sb:g}) so the update keeps some of the budget (Andrew et al. Sec. 3.1); "
        "raise config.fl.dp.clipped_count_stddev."
      )
