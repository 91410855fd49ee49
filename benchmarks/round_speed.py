"""Seconds per federated round: client-parallel strategies vs a sequential per-client loop.

  python benchmarks/round_speed.py                       # CIFAR-10-LT IF=100 shapes (GPU)
  python benchmarks/round_speed.py --preset=cpu_small    # a reduced shape that CPU finishes

Shapes of the paper's CIFAR-10-LT IF=100 round (synthetic pixels): 12406 images over 20
clients (620-621 each), 8 clients a round, 10 local epochs of batch 32 (200 steps a client),
CReFF's ResNet-8 (width 64). Every strategy runs the same round (same plans, keys, weights);
the script checks they agree, then times ``--repeats`` rounds after one compile round.
Strategies: ``vmap`` / ``map`` / ``group:G`` (one jitted sharded round, ``rounds.py``) and
``sequential`` (a Python loop over clients, each a jitted scan of its local steps, then the
same aggregation). Results go to ``benchmarks/results/round_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fedllava import algorithms, sharding  # noqa: E402
from fedllava.federate import client, rounds  # noqa: E402
from fedllava.models import resnet  # noqa: E402

PRESETS = {
  "cifar10_lt": dict(total=12406, clients=20, per_round=8, epochs=10, batch=32, width=64, hw=32),
  "cpu_small": dict(total=12406, clients=20, per_round=2, epochs=1, batch=32, width=16, hw=32),
  "tiny": dict(total=400, clients=20, per_round=2, epochs=1, batch=8, width=4, hw=8),
}


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}-{d.device_kind}".replace(" ", "_").lower()


def _sequential_round(trainer, algo, variables, server_state, inputs, n_real):
  train = jax.jit(trainer.train)
  outs, steps = [], []
  for c in range(n_real):
    plan = client.BatchPlan(*(x[c] for x in inputs.plan))
    v, m = train(variables, inputs.images[c], inputs.labels[c], plan, inputs.keys[c])
    outs.append(v)
    steps.append(m["num_steps"])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  w = inputs.weights[:n_real]
  params, server_state = algorithms.server_update(
    algo, variables["params"], server_state, stacked["params"], w, jnp.stack(steps)
  )
  stats = algorithms.base.weighted_mean(stacked["batch_stats"], w)
  return {"params": params, "batch_stats": stats}, server_state


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="cifar10_lt", choices=sorted(PRESETS))
  p.add_argument(
    "--strategies",
    default="vmap,map,group:4,sequential",
    help="comma list of STRATEGY[@CONV]: vmap, map, group:G, sequential; "
    "CONV = xla (default) or im2col, e.g. vmap@im2col",
  )
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument(
    "--precision",
    default="highest",
    help="jax_default_matmul_precision "
    "('highest' turns TF32 off, as numeric comparisons need; 'default' allows TF32)",
  )
  p.add_argument("--devices", type=int, default=0, help="mesh size (0: all)")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  s = PRESETS[a.preset]
  jax.config.update("jax_default_matmul_precision", a.precision)

  sizes = np.full(s["clients"], s["total"] // s["clients"])
  sizes[: s["total"] % s["clients"]] += 1
  n_max = int(sizes.max())
  rng = np.random.default_rng(0)
  store = rng.integers(0, 256, (s["per_round"], n_max, s["hw"], s["hw"], 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (s["per_round"], n_max)).astype(np.int32)

  def make_model(conv):
    return resnet.create_model(
      ml_collections.ConfigDict(dict(name="resnet8", width=s["width"], conv_impl=conv)), 10
    )

  variables = make_model("xla").init(jax.random.PRNGKey(0), jnp.zeros((1, s["hw"], s["hw"], 3)))
  algo = algorithms.fedavg.create()

  def make_trainer(conv):
    return client.create_local_trainer(
      make_model(conv),
      algo,
      learning_rate=0.1,
      mean=(0.5,) * 3,
      std=(0.25,) * 3,
      crop_padding=4 if s["hw"] >= 32 else 1,
      flip=True,
      per_batch_augment=False,
    )

  mesh = sharding.create_client_mesh(a.devices or None)
  pad_to = sharding.pad_to_multiple(s["per_round"], mesh)
  selected = list(range(s["per_round"]))
  inputs, ids = rounds.build_round_inputs(
    selected,
    sizes,
    n_max,
    epochs=s["epochs"],
    batch_size=s["batch"],
    seed=0,
    round_index=0,
    pad_to=pad_to,
    aug_key=jax.random.PRNGKey(1),
  )
  ids = np.asarray(ids) % s["per_round"]
  cs = sharding.client_sharding(mesh)
  inputs = inputs._replace(
    images=jax.device_put(store[ids], cs),
    labels=jax.device_put(labels[ids], cs),
    plan=jax.device_put(inputs.plan, cs),
    keys=jax.device_put(inputs.keys, cs),
    weights=jax.device_put(inputs.weights.astype(np.float32), cs),
  )
  steps = int(inputs.plan.active[0].sum())
  results = {
    "device": device_name(),
    "num_devices": mesh.size,
    "jax": jax.__version__,
    "matmul_precision": a.precision,
    "host": platform.node(),
    "preset": a.preset,
    "shapes": s,
    "local_steps_per_client": steps,
    "strategies": {},
  }
  print(json.dumps({k: v for k, v in results.items() if k != "strategies"}))
  out_path = a.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "results",
    f"round_speed_{results['device']}_{a.preset}.json",
  )
  reference = None
  for name in a.strategies.split(","):
    strat_name, _, conv = name.partition("@")
    trainer = make_trainer(conv or "xla")
    if strat_name == "sequential":
      fn = lambda v, st, x: _sequential_round(trainer, algo, v, st, x, s["per_round"])  # noqa: E731
    else:
      strat, _, g = strat_name.partition(":")
      fn = rounds.create_round_fn(trainer, algo, mesh, strat, int(g or 1))
    times = []
    for rep in range(a.repeats + 1):
      v = jax.tree.map(jnp.array, variables)
      st = algo.server_optimizer.init(v["params"])
      t0 = time.perf_counter()
      out = fn(v, st, inputs)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
    leaf = np.asarray(out[0]["params"]["classifier"]["kernel"])
    if reference is None:
      reference = leaf
    diff = float(np.abs(leaf - reference).max())
    r = {
      "first_round_s_incl_compile": times[0],
      "s_per_round": statistics.median(times[1:]),
      "examples_per_s": s["per_round"] * steps * s["batch"] / statistics.median(times[1:]),
      "max_abs_diff_vs_first_strategy": diff,
    }
    results["strategies"][name] = r
    print(name, json.dumps(r), flush=True)
    _save(results, out_path)  # after every strategy: a run cut short keeps what it measured
  print("wrote", out_path)
  return results


def _save(results: dict, path: str) -> None:
  seq = results["strategies"].get("sequential", {}).get("s_per_round")
  for r in results["strategies"].values():
    if seq:
      r["speedup_vs_sequential"] = seq / r["s_per_round"]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
