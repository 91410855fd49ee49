"""Accuracy vs epsilon of client-level DP-FedAvg on digits-LT, with and without alignment.

  python benchmarks/dp_epsilon.py --workdir=workdirs/dp_epsilon --seeds=3

For each epsilon (``inf`` = DP off) it runs ``fedllava.sweep`` on the offline default
(``configs/digits_lt.py``) with rows FedAvg and FedAvg + alignment (beta = 0: alignment on the
server's D_align is post-processing, it costs no privacy), the noise calibrated to the target
epsilon over the run's rounds (``fl.dp.target_epsilon``, delta ``fl.dp.delta``, fixed clip
``fl.dp.clip_norm``), and, for each finite epsilon, the two rows again with the noise computed as
for a larger cohort (``fl.dp.noise_cohort_size``: the noise-to-signal of a deployment that samples that
many clients a round; its epsilon refers to that larger population). Every run is an ordinary
resumable run under ``--workdir``; the summary goes to ``--out`` (JSON) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))


def _config(epsilon: float, cohort: int, rounds: int):
  import digits_lt  # configs/digits_lt.py

  c = digits_lt.get_config()
  c.fl.rounds = rounds
  if math.isfinite(epsilon):
    c.fl.dp.enabled = True
    c.fl.dp.target_epsilon = epsilon
    c.fl.dp.noise_cohort_size = cohort
  return c


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="workdirs/dp_epsilon")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--epsilons", default="inf,8,3,1")
  p.add_argument("--cohort", type=int, default=1000, help="noise_cohort_size of the variant")
  p.add_argument("--rounds", type=int, default=0, help="0: the offline default's")
  p.add_argument("--out", default="benchmarks/results/dp_epsilon_digits.json")
  a = p.parse_args(argv)
  from fedllava import sweep

  seeds = list(range(a.seeds))
  import digits_lt

  rounds = a.rounds or digits_lt.get_config().fl.rounds
  points = []
  start = time.perf_counter()
  for eps in (float(e) for e in a.epsilons.split(",")):
    # (label, noise_cohort_size, with the alignment row). With the simulated cohort (8 of 20
    # clients) the noise of any finite epsilon here leaves a model whose alignment diverges
    # (measured: DivergedError at epsilon 8), so only FedAvg runs there; the alignment row runs
    # without DP and at the larger cohort's noise.
    variants = [("dp", 0, not math.isfinite(eps))]
    if math.isfinite(eps) and a.cohort:
      variants.append((f"dp, noise as for a cohort of {a.cohort}", a.cohort, True))
    for label, cohort, ours in variants:
      cfg = _config(eps, cohort, rounds)
      sub = os.path.join(a.workdir, f"eps_{eps:g}" + (f"_cohort{cohort}" if cohort else ""))
      table = sweep.run(cfg, ["fedavg"], seeds, sub, ours=ours)
      for row in table["rows"]:
        points.append(
          {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": cfg.fl.dp.delta if math.isfinite(eps) else None,
            "noise_cohort_size": cohort or None,
            "variant": label if math.isfinite(eps) else "no DP",
            "row": row["label"],
            "top1": row["top1"],
            "few": row["few"],
          }
        )
  out = {
    "command": "python benchmarks/dp_epsilon.py " + " ".join(argv or sys.argv[1:]),
    "config": "configs/digits_lt.py (offline default)",
    "rounds": rounds,
    "seeds": seeds,
    "clip_norm": _config(1.0, 0, rounds).fl.dp.clip_norm,
    "accounting": _config(1.0, 0, rounds).fl.dp.accounting,
    "wall_s": time.perf_counter() - start,
    "points": points,
  }
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  _plot(out, os.path.splitext(a.out)[0] + ".png")
  print(json.dumps(out, indent=1))
  return out


def _plot(out: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  series = {}
  for pt in out["points"]:
    series.setdefault((pt["row"], pt["variant"] if pt["epsilon"] else "dp"), []).append(pt)
  for ax, metric in zip(axes, ("top1", "few")):
    for (row, variant), pts in sorted(series.items(), key=str):
      finite = [q for q in pts if q["epsilon"]]
      base = [q for q in out["points"] if q["epsilon"] is None and q["row"] == row]
      xs = [q["epsilon"] for q in finite]
      ys = [q[metric]["mean"] for q in finite]
      es = [q[metric]["std"] or 0.0 for q in finite]
      if not xs:
        continue
      line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{row} ({variant})")
      if base:
        ax.axhline(base[0][metric]["mean"], ls="--", color=line[0].get_color(), alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (dashed: no DP)")
    ax.set_ylabel(f"{metric} accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
