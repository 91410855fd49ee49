"""Client-level DP accounting (host side): epsilon after t rounds, noise calibration, the plan.

Uses the maintained ``dp-accounting`` library's RDP accountant. Sampling m of N clients per
round without replacement is the library's ``SampledWithoutReplacementDpEvent`` (replace-one
neighbours: the clipped sum moves by up to 2C); ``accounting="poisson"`` gives the literature's
add/remove-one convention at q = m / N instead (not exact for our fixed-size sampler). The
mechanism itself (clip, noise, adaptive clip) is ``fedllava/privacy.py``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fedllava import errors

ACCOUNTING = ("without_replacement", "poisson")


class Accountant:
  """Epsilon after ``t`` rounds of DP-FedAvg at ``delta`` (RDP, dp_accounting).

  Args:
    num_clients: ``N`` (with ``noise_cohort_size`` the population the guarantee refers to is
      ``N M / m``, sampled at the same rate).
    cohort: ``m`` clients sampled per round (``M`` with ``noise_cohort_size``).
    noise_multiplier: ``z`` (adaptive clipping: ``z_Delta`` and ``2 sigma_b`` composed).
    count_noise: ``sigma_b`` (0: no adaptive clipping).
    accounting: ``"without_replacement"`` (replace-one) or ``"poisson"`` (add/remove-one).
  """

  def __init__(self, num_clients, cohort, noise_multiplier, delta, count_noise=0.0,
               accounting="without_replacement"):  # fmt: skip
    import dp_accounting as dpa
    from dp_accounting import rdp

    self.delta, self.accounting = delta, accounting
    update = update_noise_multiplier(noise_multiplier, count_noise)
    # Sensitivities: add/remove-one, C for the sum and 1/2 for the centred count; replace-one
    # doubles both (2C, 1).
    factor = 1.0 if accounting == "poisson" else 0.5
    parts = [dpa.GaussianDpEvent(update * factor)]
    if count_noise > 0:
      parts.append(dpa.GaussianDpEvent(2 * count_noise * factor))
    inner = parts[0] if len(parts) == 1 else dpa.ComposedDpEvent(parts)
    if accounting == "poisson":
      self.event = dpa.PoissonSampledDpEvent(cohort / num_clients, inner)
      relation = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    else:
      self.event = dpa.SampledWithoutReplacementDpEvent(num_clients, cohort, inner)
      relation = dpa.NeighboringRelation.REPLACE_ONE
    acc = rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(self.event)
    # One round's RDP curve (the library keeps it in these attributes; composing over rounds is
    # multiplying it, so epsilon(t) needs no new accountant per round).
    self.orders, self.rdp_per_round = np.asarray(acc._orders), np.asarray(acc._rdp)

  def epsilon(self, rounds: int) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (RDP composes linearly over rounds)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    if rounds <= 0:
      return 0.0
    return float(rdp_privacy_accountant.compute_epsilon(
      self.orders, self.rdp_per_round * rounds, self.delta)[0])  # fmt: skip

  def max_rounds(self, budget: float, rounds: int) -> int:
    """The most rounds ``<= rounds`` whose epsilon stays within ``budget``."""
    lo, hi = 0, rounds
    while lo < hi:  # epsilon grows with rounds
      mid = (lo + hi + 1) // 2
      lo, hi = (mid, hi) if self.epsilon(mid) <= budget else (lo, mid - 1)
    return lo


def update_noise_multiplier(z: float, count_noise: float) -> float:
  """Andrew et al. Sec. 3.1: ``z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` (``z`` without the count)."""
  if count_noise <= 0 or z <= 0:
    return z
  return (z**-2 - (2 * count_noise) ** -2) ** -0.5


@functools.lru_cache(maxsize=32)
def calibrate_noise(target_epsilon, rounds, num_clients, cohort, delta, accounting) -> float:
  """The smallest ``z`` (to 0.1%) whose epsilon after ``rounds`` is ``<= target_epsilon``
  (binary search with the accountant). With adaptive clipping ``z`` is the total of both
  releases (``z_Delta`` and ``2 sigma_b`` compose to it), so the same ``z`` is calibrated."""

  def eps(z):
    return Accountant(num_clients, cohort, z, delta, 0.0, accounting).epsilon(rounds)

  lo, hi = 0.0, 1.0
  while eps(hi) > target_epsilon:
    lo, hi = hi, hi * 2
    if hi > 1e4:
      raise errors.ConfigError(
        f"config.fl.dp.target_epsilon={target_epsilon} is out of reach for {rounds} rounds "
        "(noise multiplier above 1e4); raise it or lower config.fl.rounds."
      )
  while hi - lo > 1e-3 * hi:
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
  return hi


# ---- from config.fl.dp ----
def cohort(fl) -> int:
  return int(fl.dp.noise_cohort_size or fl.clients_per_round)


def count_noise(fl) -> float:
  """``sigma_b``: ``clipped_count_stddev`` or Andrew et al.'s ``M / 20``."""
  if not fl.dp.adaptive_clip:
    return 0.0
  return float(fl.dp.clipped_count_stddev or cohort(fl) / 20)


def noise_multiplier(fl) -> float:
  """``z``: ``config.fl.dp.noise_multiplier``, or calibrated to ``target_epsilon`` over
  ``config.fl.rounds``."""
  dp = fl.dp
  if not dp.target_epsilon:
    return float(dp.noise_multiplier)
  return calibrate_noise(float(dp.target_epsilon), int(fl.rounds), population(fl), cohort(fl),
                         float(dp.delta), dp.accounting)  # fmt: skip


def population(fl) -> int:
  """``N`` (``N M / m`` with ``noise_cohort_size``: the population the guarantee refers to)."""
  m, big = fl.clients_per_round, cohort(fl)
  return int(round(fl.num_clients * big / m))


def accountant_from_config(fl) -> Accountant | None:
  """The run's accountant, or None when DP is off."""
  if not fl.dp.enabled:
    return None
  return Accountant(population(fl), cohort(fl), noise_multiplier(fl), float(fl.dp.delta),
                    count_noise(fl), fl.dp.accounting)  # fmt: skip


def plan(fl, accountant, done) -> int:
  """Prints the privacy plan; returns the rounds to run (fewer when the budget stops earlier)."""
  dp = fl.dp
  z = noise_multiplier(fl)
  how = (
    "sampling without replacement, replace-one"
    if dp.accounting == "without_replacement"
    else "Poisson sampling at q = m / N, add/remove-one (the literature's convention; not "
    "exact for our fixed-size sampler)"
  )
  print(
    f"[dp] client-level DP-FedAvg: clip {dp.clip_norm:g}"
    + (" (adaptive)" if dp.adaptive_clip else "")
    + f", noise multiplier {z:.4g}"
    + (f" (calibrated to target_epsilon={dp.target_epsilon:g})" if dp.target_epsilon else "")
    + f"; accountant: RDP, {how}; epsilon after {fl.rounds} rounds "
    f"{accountant.epsilon(fl.rounds):.4g} at delta={dp.delta:g}"
  )
  if dp.noise_cohort_size:
    print(
      f"[dp] noise_cohort_size={dp.noise_cohort_size}: noise as for a cohort of that size; "
      "epsilon refers to a population of "
      f"{fl.num_clients * dp.noise_cohort_size // fl.clients_per_round} clients"
    )
  if not dp.epsilon_budget:
    return fl.rounds
  stop = accountant.max_rounds(dp.epsilon_budget, fl.rounds)
  if stop < fl.rounds:
    print(
      f"[dp] stopping after round {stop} of {fl.rounds}: round {stop + 1} would bring epsilon "
      f"to {accountant.epsilon(stop + 1):.4g} > config.fl.dp.epsilon_budget="
      f"{dp.epsilon_budget:g} (delta={dp.delta:g})"
    )
  return max(stop, done)  # a resumed run never goes back


def report(fl, accountant, rounds_run) -> dict:
  """The ``dp`` block of stage 2's report.json."""
  eps = accountant.epsilon(rounds_run)
  return {
    "epsilon": eps if math.isfinite(eps) else None,
    "delta": fl.dp.delta,
    "rounds_run": rounds_run,
    "stopped_by_budget": rounds_run < fl.rounds,
    "noise_multiplier": noise_multiplier(fl),
    "accounting": fl.dp.accounting,
    "noise_cohort_size": fl.dp.noise_cohort_size or fl.clients_per_round,
  }
