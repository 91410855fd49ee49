"""One federated round of the paper's CIFAR-10-LT IF=100 setup, every contender, one run.

  python benchmarks/fl_round.py --preset=paper       # the paper's round (GPU)
  python benchmarks/fl_round.py --preset=cpu_small   # a reduced shape a 2-core CPU finishes
  python benchmarks/fl_round.py --preset=ci          # 2 tiny clients, seconds (tests)

The round (synthetic pixels, real shapes): CReFF's ResNet-8 (width 64), 20 clients whose sizes
are CReFF's partition of CIFAR-10-LT IF=100 (12406 images, equal contiguous chunks: 620-621
each), 8 sampled a round, 10 local epochs of batch 32, SGD lr 0.1, random crop (padding 4) and
horizontal flip, FedAvg weighted by client size.

Contenders (``--contenders``, a comma list; the preset picks a default):

* ``jax:STRATEGY@CONV:DTYPE``: fedllava's jitted sharded round (``fedllava/federate/rounds.py``),
  STRATEGY = vmap | map | group:G, CONV = xla | im2col | shift | eigen | onednn
  (``config.model.conv_impl``)
  with an optional ``+dot`` (``config.model.bn_impl``; default ``reduce``),
  DTYPE = fp32 | bf16 (``config.model.compute_dtype``: bf16 compute, fp32 master weights);
* ``torch:creff``: CReFF's own loop in PyTorch (``torch_reference.creff_round``);
* ``torch:fast:DTYPE`` / ``torch:compile:DTYPE``: the best honest PyTorch
  (``torch_reference.FastRound``), without / with ``torch.compile``; a ``:tN`` suffix runs
  it with N intra-op threads (on a CPU shared with other work, 1 thread can win by 10x);
* ``pfl:fp32``: Apple's pfl-research simulator with its PyTorch backend (``pfl_reference.py``).

Every contender is compiled / warmed up first, then the timed rounds run interleaved
(contender A, B, C, A, B, C, ...) so that a shared machine's load hits all alike; each reports
the median s/round, examples/s, achieved TFLOP/s (ResNet-8's conv + linear FLOPs counted
analytically, training = 3x forward), % of the device's peak, and peak memory. A contender that
fails records ``"skipped: <reason>"``. Output: ``benchmarks/results/fl_round_<preset>_<device>.json``
and a bar chart ``.png`` next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback
from typing import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# The CIFAR-10-LT IF=100 long tail: n_c = int(5000 * 0.01 ** (c / 9)), 12406 images.
CIFAR10_LT_IF100 = 12406

PRESETS = {
  "paper": dict(
    total=CIFAR10_LT_IF100, clients=20, per_round=8, epochs=10, batch=32, width=64, hw=32, crop=4
  ),
  "cpu_small": dict(
    total=CIFAR10_LT_IF100, clients=20, per_round=2, epochs=1, batch=32, width=16, hw=32, crop=4
  ),
  "ci": dict(total=400, clients=20, per_round=2, epochs=1, batch=8, width=4, hw=8, crop=1),
}

JAX_ALL = [
  f"jax:{s}@{c}:{d}" for d in ("fp32", "bf16") for c in ("xla", "im2col") for s in ("vmap", "map")
]
TORCH_ALL = ["torch:creff", "torch:fast:fp32", "torch:fast:bf16", "torch:compile:fp32"]
DEFAULT_CONTENDERS = {
  "paper": JAX_ALL
  + ["jax:map@eigen:fp32", "jax:map@eigen:bf16", "jax:group:4@xla:fp32", "jax:group:4@xla:bf16"]
  + TORCH_ALL
  + ["torch:compile:bf16", "pfl:fp32"],
  # CPU: oneDNN's convolutions (conv_impl=onednn), or XLA's only through conv_impl=eigen
  # (autodiff's gradient convolutions run 20-70x slower inside the local-step scan there:
  # benchmarks/README.md); PyTorch on 1 thread (on a shared 2-core machine 1 thread wins),
  # `auto` (map@onednn:fp32) first.
  "cpu_small": [
    "jax:map@onednn:fp32",
    "jax:map@onednn:bf16",
    "jax:vmap@onednn:fp32",
    "jax:map@eigen:fp32",
    "jax:map@eigen+dot:fp32",
    "jax:map@eigen:bf16",
    "jax:vmap@eigen:fp32",
    "jax:map@shift:fp32",
    "jax:vmap@shift:fp32",
    "jax:vmap@shift:bf16",
    "torch:creff:t1",
    "torch:fast:fp32:t1",
    "torch:fast:bf16:t1",
    "torch:compile:fp32:t1",
    "pfl:fp32:t1",
  ],
  "ci": [
    "jax:vmap@im2col:fp32",
    "jax:map@onednn:fp32",
    "jax:map@eigen:fp32",
    "jax:map@xla:bf16",
    "torch:creff",
    "torch:fast:fp32",
    "pfl:fp32",
  ],
}

# Dense peak TFLOP/s by device kind (vendor data sheets; SXM parts, without sparsity).
PEAK_TFLOPS = {
  "nvidia h200": {"fp32": 67.0, "bf16": 989.0},
  "nvidia h100 80gb hbm3": {"fp32": 67.0, "bf16": 989.0},
  "nvidia h100": {"fp32": 67.0, "bf16": 989.0},
  "nvidia a100-sxm4-80gb": {"fp32": 19.5, "bf16": 312.0},
  "nvidia a100-sxm4-40gb": {"fp32": 19.5, "bf16": 312.0},
}

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def client_sizes(total: int, clients: int) -> np.ndarray:
  """CReFF's partition sizes: equal contiguous chunks, the first ``total % K`` one longer."""
  per, rem = divmod(total, clients)
  return np.asarray([per + 1] * rem + [per] * (clients - rem))


def conv_flops(hw_out: int, cin: int, cout: int, k: int) -> int:
  """Multiply-adds x 2 of one bias-free k x k convolution, per example."""
  return 2 * hw_out * hw_out * cin * cout * k * k


def resnet8_forward_flops(width: int, hw: int, num_classes: int = 10, cin: int = 3) -> int:
  """Forward FLOPs per example of CReFF's ResNet-8 (convs + classifier; BN/ReLU/pool omitted)."""
  w = width
  f = conv_flops(hw, cin, w, 3)  # stem
  f += 2 * conv_flops(hw, w, w, 3)  # layer1
  h2, h3 = (hw + 1) // 2, (hw + 3) // 4
  f += conv_flops(h2, w, 2 * w, 3) + conv_flops(h2, 2 * w, 2 * w, 3) + conv_flops(h2, w, 2 * w, 1)
  f += (
    conv_flops(h3, 2 * w, 4 * w, 3)
    + conv_flops(h3, 4 * w, 4 * w, 3)
    + conv_flops(h3, 2 * w, 4 * w, 1)
  )
  return f + 2 * 4 * w * num_classes


def resnet8_train_flops(width: int, hw: int, num_classes: int = 10) -> int:
  """Training FLOPs per example: forward + backward (2x forward: input and weight grads)."""
  return 3 * resnet8_forward_flops(width, hw, num_classes)


def cpu_peak_tflops() -> dict:
  """An estimate for this CPU: cores x clock x FLOP/cycle (AVX-512: 2 FMA x 16 fp32; AMX bf16
  tiles: 1024 bf16 FLOP/cycle/core where ``amx_bf16`` is present, else AVX-512 BF16 2x fp32)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  ghz, flags = 2.0, ""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    mhz = [float(x.split(":")[1]) for x in info.splitlines() if x.startswith("cpu MHz")]
    ghz = (max(mhz) / 1000.0) if mhz else ghz
    flags = next((x for x in info.splitlines() if x.startswith("flags")), "")
  except OSError:
    pass
  per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 8
  bf16 = 1024 if "amx_bf16" in flags else 2 * per_cycle if "avx512_bf16" in flags else per_cycle
  return {
    "fp32": cores * ghz * per_cycle / 1e3,
    "bf16": cores * ghz * bf16 / 1e3,
    "estimate": f"{cores} cores x {ghz:.2f} GHz x FLOP/cycle (fp32 {per_cycle}, bf16 {bf16})",
  }


class PeakRSS:
  """Samples this process's resident memory every 5 ms while a contender runs (CPU memory)."""

  def __init__(self):
    import psutil  # pylint: disable=g-import-not-at-top

    self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

  def __enter__(self):
    self._stop.clear()
    self.peak = max(self.peak, self.proc.memory_info().rss)
    self._t = threading.Thread(target=self._loop, daemon=True)
    self._t.start()
    return self

  def _loop(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, self.proc.memory_info().rss)

  def __exit__(self, *exc):
    self._stop.set()
    self._t.join()


# --------------------------------------------------------------------------------------------
# Data shared by every contender (same pixels, labels and client sizes).


def make_data(s: dict, seed: int = 0) -> dict:
  sizes = client_sizes(s["total"], s["clients"])
  selected = list(range(s["per_round"]))  # any 8 of 20: the largest come first
  n_max = int(sizes.max())
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (s["per_round"], n_max, s["hw"], s["hw"], 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (s["per_round"], n_max)).astype(np.int32)
  return dict(sizes=sizes, selected=selected, n_max=n_max, images=images, labels=labels)


# --------------------------------------------------------------------------------------------
# fedllava (JAX)


def fedavg_trainer(s: dict, conv: str, dt: str, bn: str = "reduce"):
  """The benchmarks' ResNet-8 (preset ``s``'s width, ``conv`` lowering, ``dt`` = fp32 | bf16
  compute, ``bn`` = BN statistics), FedAvg and CReFF's local trainer (SGD 0.1, crop + flip):
  ``(model, algo, trainer)``."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from fedllava import algorithms  # pylint: disable=g-import-not-at-top
  from fedllava.federate import client  # pylint: disable=g-import-not-at-top
  from fedllava.models import resnet  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict(
    dict(
      name="resnet8",
      width=s["width"],
      conv_impl=conv,
      bn_impl=bn,
      dtype="float32",
      compute_dtype={"fp32": "float32", "bf16": "bfloat16"}[dt],
      mlp_dim=None,
      head_on_mlp=False,
    )
  )
  resnet.validate(cfg)
  model = resnet.create_model(cfg, 10)
  algo = algorithms.fedavg.create()
  trainer = client.create_local_trainer(
    model,
    algo,
    learning_rate=0.1,
    mean=MEAN,
    std=STD,
    crop_padding=s["crop"],
    flip=True,
    per_batch_augment=False,
  )
  return model, algo, trainer


def _jax_contender(spec: str, s: dict, d: dict, mesh_devices: int) -> tuple[Callable, dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp

  from fedllava import sharding
  from fedllava.federate import rounds

  strat_conv, dt = spec[len("jax:") :].rsplit(":", 1)  # "group:4@xla", "bf16"
  strat_name, conv = strat_conv.split("@")
  strat, _, g = strat_name.partition(":")
  conv, _, bn = conv.partition("+")  # "eigen+dot"
  model, algo, trainer = fedavg_trainer(s, conv, dt, bn or "reduce")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, s["hw"], s["hw"], 3)))
  mesh = sharding.create_client_mesh(mesh_devices or None)
  pad_to = sharding.pad_to_multiple(s["per_round"], mesh)
  inputs, ids = rounds.build_round_inputs(
    d["selected"],
    d["sizes"],
    d["n_max"],
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
    images=jax.device_put(d["images"][ids], cs),
    labels=jax.device_put(d["labels"][ids], cs),
    plan=jax.device_put(inputs.plan, cs),
    keys=jax.device_put(inputs.keys, cs),
    weights=jax.device_put(inputs.weights.astype(np.float32), cs),
  )
  fn = rounds.create_round_fn(trainer, algo, mesh, strat, int(g or 1))
  state = {}

  def run():
    v = jax.tree.map(jnp.array, variables)
    st = algo.server_optimizer.init(v["params"])
    out = fn(v, st, inputs)
    jax.block_until_ready(out)
    state["leaf"] = np.asarray(out[0]["params"]["classifier"]["kernel"], np.float64)
    state["loss"] = float(out[2]["train/loss"])

  return run, state


def _jax_memory() -> int | None:
  import jax  # pylint: disable=g-import-not-at-top

  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001  (CPU: not implemented)
    return None
  return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


# --------------------------------------------------------------------------------------------
# PyTorch and pfl


def _torch_device() -> str:
  import torch  # pylint: disable=g-import-not-at-top

  return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_contender(spec: str, s: dict, d: dict) -> tuple[Callable, dict]:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference as tr

  dev = _torch_device()
  spec, _, threads = spec.partition(":t")  # "torch:fast:fp32:t1": one intra-op thread
  nthreads = int(threads) if threads else torch.get_num_threads()
  torch.manual_seed(0)
  sizes = [int(d["sizes"][c]) for c in d["selected"]]
  model = tr.ResNet8(s["width"], 10).to(dev)
  global_sd = {k: v.clone() for k, v in model.state_dict().items()}
  state = {}
  if spec == "torch:creff":
    clients = tr.creff_clients(d["images"], d["labels"], sizes, MEAN, STD, dev)

    def run():
      torch.set_num_threads(nthreads)
      out = tr.creff_round(
        model,
        global_sd,
        clients,
        epochs=s["epochs"],
        batch_size=s["batch"],
        lr=0.1,
        padding=s["crop"],
        flip=True,
      )
      if dev == "cuda":
        torch.cuda.synchronize()
      state["leaf"] = out["fc.weight"].double().cpu().numpy().T

    return run, state
  _, kind, dt = spec.split(":")
  bf16 = dt == "bf16"
  fr = tr.FastRound(
    model,
    d["images"],
    d["labels"],
    sizes,
    mean=MEAN,
    std=STD,
    epochs=s["epochs"],
    batch_size=s["batch"],
    lr=0.1,
    padding=s["crop"],
    flip=True,
    device=dev,
    bf16=bf16,
    compile=kind == "compile",
  )

  def run():
    torch.set_num_threads(nthreads)
    out = fr(global_sd)
    if dev == "cuda":
      torch.cuda.synchronize()
    state["leaf"] = out["fc.weight"].double().cpu().numpy().T

  return run, state


def _pfl_contender(spec: str, s: dict, d: dict) -> tuple[Callable, dict]:
  import pfl_reference  # pylint: disable=g-import-not-at-top
  import torch

  _, _, threads = spec.partition(":t")
  nthreads = int(threads) if threads else torch.get_num_threads()
  sizes = [int(d["sizes"][c]) for c in d["selected"]]
  run, state = pfl_reference.make_round(
    d["images"], d["labels"], sizes, s, MEAN, STD, _torch_device()
  )

  def run_threads():
    torch.set_num_threads(nthreads)
    run()

  return run_threads, state


# --------------------------------------------------------------------------------------------


def device_info() -> dict:
  try:
    import jax  # pylint: disable=g-import-not-at-top

    dev = jax.devices()[0]
    kind, platform_name = dev.device_kind, dev.platform
  except Exception:  # noqa: BLE001
    kind, platform_name = platform.processor() or "cpu", "cpu"
  cpu_model = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "")
  except OSError:
    pass
  name = f"{platform_name}-{kind}".replace(" ", "_").lower()
  return dict(device=name, device_kind=kind, platform=platform_name, cpu_model=cpu_model)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
  p.add_argument("--contenders", default="", help="comma list (see the module docstring)")
  p.add_argument("--skip", default="", help="comma list of contender prefixes to leave out")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds per contender")
  p.add_argument("--precision", default="highest", help="jax_default_matmul_precision")
  p.add_argument("--devices", type=int, default=0, help="jax mesh size (0: all)")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="override the peak (fp32 & bf16)")
  p.add_argument("--out", default="", help="JSON path (default benchmarks/results/...)")
  p.add_argument("--no_plot", action="store_true")
  a = p.parse_args(argv)
  s = PRESETS[a.preset]
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_default_matmul_precision", a.precision)
  info = device_info()
  specs = [c for c in (a.contenders.split(",") if a.contenders else DEFAULT_CONTENDERS[a.preset])]
  specs = [c for c in specs if c and not any(c.startswith(x) for x in a.skip.split(",") if x)]
  d = make_data(s)
  sizes_sel = [int(d["sizes"][c]) for c in d["selected"]]
  examples = s["epochs"] * sum(sizes_sel)
  flops_ex = resnet8_train_flops(s["width"], s["hw"])
  if info["platform"] == "cpu":
    peak = cpu_peak_tflops()
  else:
    peak = dict(PEAK_TFLOPS.get(info["device_kind"].lower(), {}))
  if a.peak_tflops:
    peak = {"fp32": a.peak_tflops, "bf16": a.peak_tflops, "estimate": "--peak_tflops"}
  out_path = a.out or os.path.join(HERE, "results", f"fl_round_{a.preset}_{info['device']}.json")
  results = {
    **info,
    "host": platform.node(),
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "matmul_precision": a.precision,
    "preset": a.preset,
    "shapes": s,
    "client_sizes_selected": sizes_sel,
    "examples_per_round": examples,
    "train_flops_per_example": flops_ex,
    "round_tflop": examples * flops_ex / 1e12,
    "peak_tflops": peak,
    "load_average_start": list(os.getloadavg()),
    "repeats": a.repeats,
    "contenders": {},
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top

    results["torch"] = torch.__version__
    results["torch_threads"] = torch.get_num_threads()
    # The fp32 oracle path turns TF32 off in both frameworks (PyTorch's convs default to TF32).
    tf32 = a.precision != "highest"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    results["torch_tf32"] = tf32
  except ImportError:
    torch = None
  print(json.dumps({k: v for k, v in results.items() if k != "contenders"}), flush=True)

  runs: dict[str, tuple[Callable, dict]] = {}
  rss = PeakRSS() if info["platform"] == "cpu" else None
  for spec in specs:
    r = results["contenders"].setdefault(spec, {})
    try:
      if spec.startswith("jax:"):
        run, state = _jax_contender(spec, s, d, a.devices)
      elif spec.startswith("torch:"):
        if torch is None:
          raise ImportError("torch is not installed (pip install -r requirements-bench.txt)")
        run, state = _torch_contender(spec, s, d)
      elif spec.startswith("pfl:"):
        run, state = _pfl_contender(spec, s, d)
      else:
        raise ValueError(f"unknown contender {spec!r}")
      t0 = time.perf_counter()
      run()  # compile / warm up
      r["first_round_s_incl_compile"] = time.perf_counter() - t0
      runs[spec] = (run, state)
      r["times"] = []
      print(spec, "warm", f"{r['first_round_s_incl_compile']:.2f}s", flush=True)
    except Exception as e:  # noqa: BLE001
      r.clear()
      r["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
      print(spec, "skipped:", r["skipped"], flush=True)
      traceback.print_exc(limit=3)
    _save(results, out_path)

  peaks = {k: 0 for k in runs}
  for rep in range(a.repeats):
    for spec, (run, _) in runs.items():  # interleaved: A, B, C, A, B, C, ...
      gc.collect()
      if torch is not None and spec.startswith(("torch", "pfl")) and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
      t0 = time.perf_counter()
      if rss is not None:
        rss.peak = 0
        with rss:
          run()
        peaks[spec] = max(peaks[spec], rss.peak)
      else:
        run()
        if spec.startswith(("torch", "pfl")):
          peaks[spec] = max(peaks[spec], torch.cuda.max_memory_allocated())
        else:
          peaks[spec] = _jax_memory() or 0
      results["contenders"][spec]["times"].append(time.perf_counter() - t0)
    print(
      "repeat",
      rep,
      {k: round(v["times"][-1], 3) for k, v in results["contenders"].items() if v.get("times")},
      flush=True,
    )

  reference = None
  for spec, (_, state) in runs.items():
    r = results["contenders"][spec]
    t = statistics.median(r["times"])
    dt = "bf16" if ":bf16" in spec else "fp32"
    tflops = examples * flops_ex / t / 1e12
    r.update(
      s_per_round=t,
      examples_per_s=examples / t,
      achieved_tflops=tflops,
      pct_of_peak=(100.0 * tflops / peak[dt]) if peak.get(dt) else None,
      peak_memory_bytes=peaks[spec] or None,
      peak_memory_kind=(
        "process RSS while it ran (CPU)"
        if rss is not None
        else "jax peak_bytes_in_use (process-wide)"
        if spec.startswith("jax")
        else "torch.cuda.max_memory_allocated"
      ),
    )
    if spec.startswith("jax:") and spec.endswith("fp32"):
      reference = state["leaf"] if reference is None else reference
      r["max_abs_diff_vs_first_jax_fp32"] = float(np.abs(state["leaf"] - reference).max())
  torch_best = [
    v["s_per_round"]
    for k, v in results["contenders"].items()
    if k.startswith("torch:") and k != "torch:creff" and "s_per_round" in v
  ]
  if torch_best:
    results["best_honest_torch_s_per_round"] = min(torch_best)
    for v in results["contenders"].values():
      if "s_per_round" in v:
        v["speed_vs_best_torch"] = min(torch_best) / v["s_per_round"]
  results["load_average_end"] = list(os.getloadavg())
  results["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  _save(results, out_path)
  if not a.no_plot:
    try:
      plot(results, out_path[: -len(".json")] + ".png")
    except Exception as e:  # noqa: BLE001
      print("plot failed:", e)
  _print_table(results)
  print("wrote", out_path)
  return results


def _print_table(results: dict) -> None:
  print(
    f"{'contender':28s} {'s/round':>9s} {'ex/s':>9s} {'TFLOP/s':>8s} {'%peak':>6s} {'vs torch':>8s}"
  )
  for k, v in results["contenders"].items():
    if "s_per_round" not in v:
      print(f"{k:28s} {v.get('skipped', '')}")
      continue
    pct = v["pct_of_peak"]
    print(
      f"{k:28s} {v['s_per_round']:9.3f} {v['examples_per_s']:9.1f} {v['achieved_tflops']:8.4f} "
      f"{(pct if pct is not None else float('nan')):6.2f} {v.get('speed_vs_best_torch', float('nan')):8.2f}"
    )


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  items = [(k, v["s_per_round"]) for k, v in results["contenders"].items() if "s_per_round" in v]
  if not items:
    return
  fig, ax = plt.subplots(figsize=(8, 0.35 * len(items) + 1.5))
  names, vals = zip(*items)
  colors = ["C0" if n.startswith("jax") else "C3" if n.startswith("torch") else "C2" for n in names]
  ax.barh(range(len(vals)), vals, color=colors)
  ax.set_yticks(range(len(vals)), names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("seconds per round (median, lower is better)")
  machine = results["cpu_model"] if results["platform"] == "cpu" else results["device_kind"]
  ax.set_title(
    f"fl_round {results['preset']}: {machine} ({results['device']}), "
    f"load {results['load_average_start'][0]:.1f}",
    fontsize=9,
  )
  for i, v in enumerate(vals):
    ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _save(results: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1, default=str)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
