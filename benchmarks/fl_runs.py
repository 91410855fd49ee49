"""Several runs (seeds) as one program: seconds per run per round for R = 1, 3, 8 in one invocation.

  python benchmarks/fl_runs.py --preset=paper       # the paper's round (GPU)
  python benchmarks/fl_runs.py --preset=cpu_small   # a reduced shape a 2-core CPU finishes
  python benchmarks/fl_runs.py --preset=ci --runs=1,2 --repeats=1   # seconds (tests)

The round of ``benchmarks/fl_round.py`` (same presets: CReFF's ResNet-8, CReFF's client sizes,
synthetic pixels), FedAvg. For each R, R seeds (0 .. R-1: each its own pixels, client sample,
batch plans, augmentation keys and initial model) are stacked on a run axis and run as one
compiled round, ``rounds.create_multirun_round_fn`` (what ``fedllava.sweep --runs_together``
and ``federate/multirun.py`` run); ``--single`` also times R = 1 through the one-run round
(``create_round_fn``) for reference. Every R is compiled first, then the timed rounds run
interleaved (R = 1, 3, 8, 1, 3, 8, ...) so a shared machine's load hits all alike; each
reports the median s/round and s/round/run. Output:
``benchmarks/results/fl_runs_<preset>_<device>.json`` with ``runs``, ``seeds``, ``s_per_round``
and ``s_per_run_per_round`` (lists, one entry per R).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import fl_round  # noqa: E402  (presets, data, device info)


def _build(s: dict, runs: int, strategy: str, conv: str, dtype: str, devices: int, single: bool):
  """``(run() -> loss, seeds)``: R seeds' first rounds, stacked, on the multi-run round."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from fedllava import sharding
  from fedllava.federate import rounds

  model, algo, trainer = fl_round.fedavg_trainer(s, conv, dtype)
  mesh = sharding.create_client_mesh(devices or None)
  pad_to = sharding.pad_to_multiple(s["per_round"], mesh)
  seeds = list(range(runs))
  per_run = []
  for seed in seeds:
    d = fl_round.make_data(s, seed)
    selected = rounds.sample_clients(seed, 0, s["clients"], s["per_round"])
    inputs, ids = rounds.build_round_inputs(
      selected,
      d["sizes"],
      d["n_max"],
      epochs=s["epochs"],
      batch_size=s["batch"],
      seed=seed,
      round_index=0,
      pad_to=pad_to,
      aug_key=jax.random.PRNGKey(1000 + seed),
    )
    rows = np.arange(len(ids)) % s["per_round"]  # this seed's pixels for its sampled clients
    inputs = inputs._replace(
      images=d["images"][rows],
      labels=d["labels"][rows],
      weights=inputs.weights.astype(np.float32),
    )
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, s["hw"], s["hw"], 3)))
    per_run.append((variables, algo.server_optimizer.init(variables["params"]), inputs))
  if single:
    cs = sharding.client_sharding(mesh)
    fn = rounds.create_round_fn(trainer, algo, mesh, strategy)
    variables, opt, inputs = per_run[0]
    inputs = jax.device_put(inputs, cs)
    extra = None
  else:
    cs = NamedSharding(mesh, P(None, sharding.CLIENTS))
    fn = rounds.create_multirun_round_fn(trainer, algo, mesh, strategy)
    variables, opt, inputs = jax.tree.map(lambda *xs: np.stack(xs), *per_run)
    inputs = jax.device_put(inputs, cs)
    extra = {"data": None, "key": jnp.stack([jax.random.PRNGKey(s_) for s_ in seeds])}

  def run() -> float:
    v = jax.tree.map(jnp.array, variables)  # the round donates its model and state
    o = jax.tree.map(jnp.array, opt)
    out = fn(v, o, inputs, extra)
    jax.block_until_ready(out)
    return float(np.mean(np.asarray(out[2]["train/loss"])))

  return run, seeds


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="paper", choices=sorted(fl_round.PRESETS))
  p.add_argument("--runs", default="1,3,8", help="comma list of R (runs in one program)")
  p.add_argument("--strategy", default="auto", help="config.fl.client_parallelism")
  p.add_argument("--conv", default="auto", help="config.model.conv_impl")
  p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
  p.add_argument("--repeats", type=int, default=3, help="timed rounds per R")
  p.add_argument("--precision", default="highest", help="jax_default_matmul_precision")
  p.add_argument("--devices", type=int, default=0, help="jax mesh size (0: all)")
  p.add_argument("--single", action="store_true", help="also time the one-run round (R=1)")
  p.add_argument("--out", default="", help="JSON path (default benchmarks/results/...)")
  a = p.parse_args(argv)
  s = fl_round.PRESETS[a.preset]
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_default_matmul_precision", a.precision)
  info = fl_round.device_info()
  runs = [int(r) for r in a.runs.split(",") if r]
  names = [f"R={r}" for r in runs] + (["single"] if a.single else [])
  fns, seeds, compile_s = {}, {}, {}
  for name in names:
    r = 1 if name == "single" else int(name[2:])
    fn, seeds[name] = _build(s, r, a.strategy, a.conv, a.dtype, a.devices, name == "single")
    t0 = time.perf_counter()
    fn()  # compile + first round
    compile_s[name] = time.perf_counter() - t0
    fns[name] = fn
    print(f"[fl_runs] {name}: compiled and ran once in {compile_s[name]:.1f} s", flush=True)
  times = {name: [] for name in names}
  for _ in range(a.repeats):  # interleaved
    for name in names:
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  med = {name: statistics.median(times[name]) for name in names}
  results = {
    **info,
    "host": platform.node(),
    "jax": jax.__version__,
    "preset": a.preset,
    "shapes": s,
    "strategy": a.strategy,
    "conv": a.conv,
    "dtype": a.dtype,
    "matmul_precision": a.precision,
    "repeats": a.repeats,
    "runs": runs,
    "seeds": [seeds[f"R={r}"] for r in runs],
    "s_per_round": [med[f"R={r}"] for r in runs],
    "s_per_run_per_round": [med[f"R={r}"] / r for r in runs],
    "speedup_per_run_vs_R1": (
      [med[f"R={runs[0]}"] / runs[0] / (med[f"R={r}"] / r) for r in runs] if runs else []
    ),
    "times_s": times,
    "compile_and_first_round_s": compile_s,
  }
  if a.single:
    results["single_run_round_s"] = med["single"]
  for r, t, tr in zip(runs, results["s_per_round"], results["s_per_run_per_round"]):
    print(f"[fl_runs] R={r}: {t:.3f} s/round, {tr:.3f} s/run/round")
  out = a.out or os.path.join(HERE, "results", f"fl_runs_{a.preset}_{info['device']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"[fl_runs] wrote {out}")
  return results


if __name__ == "__main__":
  main()
