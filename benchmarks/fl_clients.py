"""Clients per round 8 ... 1000 on one device: seconds per example and peak memory.

  python benchmarks/fl_clients.py --preset=cpu    # tiny width, CIFAR-sized + digits (CPU)
  python benchmarks/fl_clients.py --preset=gpu    # ResNet-8 width 64 (CReFF's), GPU
  python benchmarks/fl_clients.py --preset=ci     # seconds (tests/test_benchmarks.py)

Two federated data sets over 1000 clients with small, unequal client data sets (plain
Dirichlet split, alpha 0.5, ``fedllava.data.partition.dirichlet_partition``):

* ``cifar``: CIFAR-10-sized synthetic data, 50,000 images of 32x32x3, 10 classes (about 50
  images a client, 4 to ~145);
* ``digits``: scikit-learn's digits (real 8x8 images, 1797 of them). 1000 clients need more
  examples than digits has, so the split is made over the labels repeated 10 times (17,970
  items, ~18 a client) and each item is a real digits image of that class (each image is on
  about 10 clients).

For each clients-per-round point (8, 64, 256, 1000 by default), one FedAvg round as the round
loop runs it (``rounds.sample_clients``, ``build_round_inputs`` padded to the largest client of
the population, ``create_round_fn``) with each ``--strategies`` entry: ``chunked`` (clients
sorted by step count, chunks that run only their own active steps; chunk size ``auto`` =
``fl.group_size=0`` or fixed by ``--group_sizes``), and ``vmap`` (every client padded to the
largest) for comparison. Each point is compiled once, then timed ``--repeats`` rounds (median).

Per point: ``clients_per_round``, ``examples`` (real examples trained, epochs x sum of the
sampled clients' sizes), ``s_per_round``, ``s_per_example``, ``peak_memory_bytes`` (CPU: the
process's resident memory while the round ran, data store included; GPU: jax's
``peak_bytes_in_use``, process-wide and never reset, so it is a running maximum),
``group_size`` (the chunk size used; ``auto``: what ``rounds.auto_group_size`` chose, with its
memory figures), ``active_steps`` / ``iterations`` (local steps the clients need / the
vmapped iterations x clients the strategy runs: their ratio is the padding waste),
``host_s`` (sampling + batch plans on the host). Output:
``benchmarks/results/fl_clients_<preset>_<device>.json`` and a PNG next to it (s/example and
peak memory vs clients per round).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import fl_round  # noqa: E402  (model + trainer, peak memory sampler, atomic JSON write)

PRESETS = {
  "cpu": dict(
    datasets=("cifar", "digits"),
    clients=1000,
    points=(8, 64, 256, 1000),
    epochs=1,
    batch=32,
    width=4,
    strategies=("map", "chunked"),  # map: the CPU's `auto` (each client its own active steps)
  ),
  "gpu": dict(
    datasets=("cifar", "digits"),
    clients=1000,
    points=(8, 64, 256, 1000),
    epochs=2,
    batch=32,
    width=64,
    strategies=("chunked", "vmap"),
  ),
  "ci": dict(
    datasets=("digits",),
    clients=40,
    points=(4, 40),
    epochs=1,
    batch=8,
    width=2,
    strategies=("chunked",),
    cifar_total=2000,
    cifar_hw=8,
  ),
}


def make_dataset(name: str, clients: int, p: dict, seed: int = 0) -> dict:
  """Client store ``images [K, N_max, H, W, 3]`` uint8, ``labels [K, N_max]``, ``sizes [K]``."""
  from fedllava.data import partition  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  if name == "cifar":
    total, hw = p.get("cifar_total", 50_000), p.get("cifar_hw", 32)
    labels = np.repeat(np.arange(10), total // 10).astype(np.int64)
    pool = rng.integers(0, 256, (len(labels), hw, hw, 3), dtype=np.uint8)
    pool_of = np.arange(len(labels))
  elif name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    d = load_digits()
    img = np.clip(d.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    pool = np.repeat(img[..., None], 3, axis=-1)
    reps = max(1, -(-20 * clients // len(d.target)))  # ~20 items a client
    labels = np.tile(d.target, reps).astype(np.int64)
    pool_of = np.tile(np.arange(len(d.target)), reps)  # item -> real digits image
    labels, pool_of = labels[: 20 * clients], pool_of[: 20 * clients]
  else:
    raise ValueError(f"unknown data set {name!r}")
  parts = partition.dirichlet_partition(labels, clients, 0.5, seed, num_classes=10)
  sizes = np.asarray([len(q) for q in parts])
  n_max = int(sizes.max())
  idx = np.stack([np.concatenate([q, np.full(n_max - len(q), q[0])]) for q in parts])
  return dict(images=pool[pool_of[idx]], labels=labels[idx].astype(np.int32), sizes=sizes)


def chunk_iterations(steps: np.ndarray, g: int) -> int:
  """Client-iterations the chunked strategy runs: sorted longest first, chunks of ``g``, each
  chunk ``g`` x its longest client's steps (the vmap strategy: ``g`` = all clients)."""
  st = np.sort(steps)[::-1]
  return int(g * np.sum(st[::g]))


def run_point(data: dict, m: int, strategy: str, group: str, p: dict, repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp

  from fedllava import sharding
  from fedllava.federate import rounds

  hw = data["images"].shape[2]
  shape = dict(width=p["width"], crop=4 if hw >= 32 else 1)
  model, algo, trainer = fl_round.fedavg_trainer(shape, p.get("conv", "auto"), "fp32")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, hw, hw, 3)))
  mesh = sharding.create_client_mesh(1)
  cs = sharding.client_sharding(mesh)
  k = len(data["sizes"])

  def inputs_for(r):
    t0 = time.perf_counter()
    sel = rounds.sample_clients(0, r, k, m)
    inputs, ids = rounds.build_round_inputs(
      sel,
      data["sizes"],
      data["images"].shape[1],
      epochs=p["epochs"],
      batch_size=p["batch"],
      seed=0,
      round_index=r,
      pad_to=sharding.pad_to_multiple(m, mesh),
      aug_key=jax.random.PRNGKey(1),
    )
    host_s = time.perf_counter() - t0
    inputs = inputs._replace(
      images=jax.device_put(data["images"][ids], cs),
      labels=jax.device_put(data["labels"][ids], cs),
      plan=jax.device_put(inputs.plan, cs),
      keys=jax.device_put(inputs.keys, cs),
      weights=jax.device_put(inputs.weights.astype(np.float32), cs),
      sizes=jax.device_put(inputs.sizes, cs),
    )
    examples = p["epochs"] * int(np.sum(data["sizes"][sel]))
    return inputs, examples, host_s

  g = 0 if group == "auto" else (1 if group == "-" else int(group))
  fn = rounds.create_round_fn(trainer, algo, mesh, strategy, g if strategy == "chunked" else 1)
  state = algo.server_optimizer.init(variables["params"])
  rss = fl_round.PeakRSS() if jax.devices()[0].platform == "cpu" else None

  def one(r):
    inputs, examples, host_s = inputs_for(r)
    v = jax.tree.map(jnp.array, variables)
    st = jax.tree.map(jnp.array, state)
    gc.collect()
    t0 = time.perf_counter()
    if rss is not None:
      with rss:
        out = jax.block_until_ready(fn(v, st, inputs))
    else:
      out = jax.block_until_ready(fn(v, st, inputs))
    dt = time.perf_counter() - t0
    steps = np.asarray(inputs.plan.active).sum(-1)
    return dict(
      s=dt,
      examples=examples,
      host_s=host_s,
      active_steps=int(steps.sum()),
      loss=float(out[2]["train/loss"]),
      peak=rss.peak if rss is not None else _device_peak(),
      steps=steps,
    )

  t0 = time.perf_counter()
  first = one(0)  # compile (and, for auto, choose the chunk size)
  compile_s = time.perf_counter() - t0
  timed = [one(r) for r in range(1, repeats + 1)]
  used = fn.info.get("group_size", g) if strategy == "chunked" else (1 if strategy == "map" else m)
  s_med = statistics.median(t["s"] for t in timed)
  ex = statistics.median(t["examples"] for t in timed)
  iters = [chunk_iterations(t["steps"], max(1, min(used, len(t["steps"])))) for t in timed]
  return {
    "clients_per_round": m,
    "strategy": strategy,
    "group_size_requested": group if strategy == "chunked" else None,
    "group_size": used,
    "auto": {k2: v for k2, v in fn.info.items() if k2 != "group_size"} or None,
    "examples": ex,
    "s_per_round": s_med,
    "s_per_example": statistics.median(t["s"] / t["examples"] for t in timed),
    "s_per_round_all": [t["s"] for t in timed],
    "s_per_example_all": [t["s"] / t["examples"] for t in timed],
    "first_round_s_incl_compile": compile_s,
    "peak_memory_bytes": max(t["peak"] or 0 for t in [first] + timed) or None,
    "active_steps": int(statistics.median(t["active_steps"] for t in timed)),
    "iterations": int(statistics.median(iters)),
    "host_s": statistics.median(t["host_s"] for t in timed),
    "loss": timed[-1]["loss"],
  }


def _device_peak() -> int | None:
  import jax  # pylint: disable=g-import-not-at-top

  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return int(stats.get("peak_bytes_in_use", 0)) if stats else None


def device_name() -> tuple[str, str]:
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  return f"{dev.platform}-{dev.device_kind}".replace(" ", "_").lower(), dev.device_kind


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--datasets", default="", help="comma list: cifar, digits")
  ap.add_argument("--points", default="", help="clients per round, comma list")
  ap.add_argument("--strategies", default="", help="comma list: map, chunked, vmap")
  ap.add_argument("--group_sizes", default="auto", help="chunk sizes for chunked: auto and/or N")
  ap.add_argument("--width", type=int, default=0, help="ResNet-8 width (preset's if 0)")
  ap.add_argument("--epochs", type=int, default=0)
  ap.add_argument("--conv", default="auto", help="config.model.conv_impl")
  ap.add_argument("--repeats", type=int, default=2, help="timed rounds per point")
  ap.add_argument("--precision", default="highest", help="jax_default_matmul_precision")
  ap.add_argument("--out", default="")
  ap.add_argument("--no_plot", action="store_true")
  a = ap.parse_args(argv)
  p = dict(PRESETS[a.preset])
  if a.width:
    p["width"] = a.width
  if a.epochs:
    p["epochs"] = a.epochs
  p["conv"] = a.conv
  datasets = a.datasets.split(",") if a.datasets else list(p["datasets"])
  points = [int(x) for x in a.points.split(",")] if a.points else list(p["points"])
  strategies = a.strategies.split(",") if a.strategies else list(p["strategies"])
  groups = a.group_sizes.split(",")
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_default_matmul_precision", a.precision)
  dev, kind = device_name()
  out = a.out or os.path.join(HERE, "results", f"fl_clients_{a.preset}_{dev}.json")
  res = {
    "preset": a.preset,
    "device": dev,
    "device_kind": kind,
    "host": platform.node(),
    "jax": jax.__version__,
    "matmul_precision": a.precision,
    "shapes": {k: v for k, v in p.items() if k not in ("datasets", "points", "strategies")},
    "load_average_start": list(os.getloadavg()),
    "repeats": a.repeats,
    "datasets": {},
  }
  for name in datasets:
    data = make_dataset(name, p["clients"], p)
    s = data["sizes"]
    entry = res["datasets"].setdefault(
      name,
      {
        "clients": len(s),
        "client_sizes": {"min": int(s.min()), "mean": float(s.mean()), "max": int(s.max())},
        "image_shape": list(data["images"].shape[2:]),
        "store_bytes": int(data["images"].nbytes),
        "points": [],
      },
    )
    for strategy in strategies:
      for group in groups if strategy == "chunked" else ["-"]:
        for m in points:
          if m > len(s):
            continue
          r = run_point(data, m, strategy, group, p, a.repeats)
          entry["points"].append(r)
          print(
            f"{name:6s} {strategy:7s} g={str(r['group_size']):>5s} clients={m:5d} "
            f"examples={r['examples']:7.0f} s/round={r['s_per_round']:8.3f} "
            f"s/example={r['s_per_example']:.3e} iter/active={r['iterations'] / max(r['active_steps'], 1):.2f} "
            f"peak={((r['peak_memory_bytes'] or 0) / 2**20):.0f}MiB host={r['host_s']:.3f}s",
            flush=True,
          )
          fl_round._save(res, out)
    del data
  for entry in res["datasets"].values():  # the criterion, per data set and strategy
    by = {}
    for r in entry["points"]:
      by.setdefault((r["strategy"], str(r["group_size_requested"])), []).append(r)
    entry["s_per_example_ratio_max_vs_min_clients"] = {
      f"{k[0]}:{k[1]}": v[-1]["s_per_example"] / v[0]["s_per_example"]
      for k, v in by.items()
      if len(v) > 1
    }
  res["load_average_end"] = list(os.getloadavg())
  fl_round._save(res, out)
  if not a.no_plot:
    plot(res, out[: -len(".json")] + ".png")
  print("wrote", out)
  return res


def plot(res: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for name, entry in res["datasets"].items():
    lines = {}
    for r in entry["points"]:
      lines.setdefault(f"{name} {r['strategy']} g={r['group_size_requested'] or 'all'}", []).append(
        r
      )
    for label, rs in lines.items():
      x = [r["clients_per_round"] for r in rs]
      ax1.plot(x, [r["s_per_example"] * 1e3 for r in rs], "o-", label=label)
      ax2.plot(x, [(r["peak_memory_bytes"] or 0) / 2**20 for r in rs], "o-", label=label)
  for ax, ylabel in ((ax1, "ms per example (median round)"), (ax2, "peak memory (MiB)")):
    ax.set_xscale("log")
    ax.set_xlabel("clients per round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  ax1.set_ylim(bottom=0)
  ax1.legend(fontsize=7)
  fig.suptitle(
    f"fl_clients {res['preset']}: {res['device_kind']}, width {res['shapes']['width']}, "
    f"load {res['load_average_start'][0]:.1f}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
