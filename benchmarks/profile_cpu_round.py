"""Where the CPU round's time goes: one client's local training taken apart, piece by piece.

  python benchmarks/profile_cpu_round.py                 # cpu_small shapes, every piece
  python benchmarks/profile_cpu_round.py --pieces=full@shift:fp32,fwdbwd@shift:fp32

``KIND@CONV:DTYPE:BN`` also names the BN statistics (``model.bn_impl``, default ``reduce``).

Each piece is one jitted ``lax.scan`` over the local steps of one client of
``fl_round.py --preset=cpu_small`` (621 images, 20 steps of batch 32, ResNet-8 width 16),
compiled first, then timed interleaved with the others (``--repeats`` rounds, medians), so a
shared machine's load hits all alike. Pieces (``KIND@CONV:DTYPE``):

* ``full``: ``client.create_local_trainer(...).train``, the production local training;
* ``fwdbwd``: forward + backward + SGD update on fixed, pre-augmented batches (no gather,
  normalisation, augmentation or masked carry);
* ``fwd``: the training-mode forward alone (BN batch statistics);
* ``nobn``: ``fwdbwd`` with BN replaced by the identity (what the convolutions cost);
* ``input``: the gather ``images[idx]``, normalisation and crop + flip alone;
* ``select``: the masked carry ``jnp.where(active, new, old)`` over the whole carry alone.

``--trace=PIECE`` then runs that piece under ``jax.profiler.trace`` and adds up XLA:CPU's
per-instruction events: ms per step per HLO instruction (with the JAX op it came from) and per
category (forward / backward, conv / BN, Eigen convolution or YNNPACK fusion, transpose, other).

Output: a table of ms per step and the share of ``full``, and JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

DEFAULT = [
  "full@shift:fp32",
  "full@xla:fp32",
  "full@shift:bf16",
  "full@xla:bf16",
  "fwdbwd@shift:fp32",
  "fwdbwd@xla:fp32",
  "fwdbwd@shift:bf16",
  "fwdbwd@xla:bf16",
  "fwd@shift:fp32",
  "fwd@xla:fp32",
  "nobn@shift:fp32",
  "nobn@xla:fp32",
  "input@-:fp32",
  "select@shift:fp32",
]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pieces", default=",".join(DEFAULT))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--out", default="")
  p.add_argument(
    "--trace",
    default="",
    help="a piece (e.g. full@eigen:fp32) to trace op by op with jax.profiler after the timing",
  )
  a = p.parse_args(argv)

  import fl_round
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import optax

  from fedllava.data.augment import augment, normalize
  from fedllava.federate import client
  from fedllava.models import resnet

  jax.config.update("jax_default_matmul_precision", "highest")
  s = fl_round.PRESETS["cpu_small"]
  n, batch = 621, s["batch"]
  steps = client.steps_per_epoch(n, batch)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (n, s["hw"], s["hw"], 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, (n,)).astype(np.int32))
  plan = client.make_batch_plan(n, n, 1, batch, rng)
  plan = jax.tree.map(jnp.asarray, plan)
  key = jax.random.PRNGKey(1)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(steps))
  shape = dict(s, width=a.width)  # fl_round.fedavg_trainer: the preset at --width

  fixed_x = jax.jit(
    jax.vmap(
      lambda idx, k: augment(
        normalize(images[idx], fl_round.MEAN, fl_round.STD), k, s["crop"], True, False
      )
    )
  )(plan.idx, keys)

  def build(piece):
    kind, rest = piece.split("@")
    conv, dt, *bn = rest.split(":")
    if kind == "input":

      def body(c, xs):
        idx, k = xs
        x = augment(normalize(images[idx], fl_round.MEAN, fl_round.STD), k, s["crop"], True, False)
        return c + jnp.sum(x), None

      f = jax.jit(lambda: jax.lax.scan(body, 0.0, (plan.idx, keys))[0])
      return lambda: f()
    model, algo, tr = fl_round.fedavg_trainer(shape, conv, dt, *bn)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, s["hw"], s["hw"], 3)))
    if kind == "full":
      f = jax.jit(lambda v: tr.train(v, images, labels, plan, key)[0])
      jitted[piece] = (f, variables)
      return lambda: f(variables)
    if kind == "select":

      def body(c, act):
        new = jax.tree.map(lambda x: x * 1.0001, c)
        return jax.tree.map(lambda nw, o: jnp.where(act, nw, o), new, c), None

      f = jax.jit(lambda v: jax.lax.scan(body, v, plan.active)[0])
      return lambda: f(variables)
    if kind == "nobn":  # BN replaced by the identity: the convolutions' cost
      orig = resnet.BatchNorm.__call__
      resnet.BatchNorm.__call__ = lambda self, x, train, mask=None: x.astype(self.dtype)
      try:
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, s["hw"], s["hw"], 3)))
      finally:
        resnet.BatchNorm.__call__ = orig
    tx = optax.sgd(0.1)

    def loss_fn(params, stats, x, y, w):
      out, new = model.apply(
        {"params": params, "batch_stats": stats}, x, train=True, mask=w, mutable=["batch_stats"]
      )
      return algo.client_loss(out, y, w, None), new["batch_stats"]

    def body(carry, xs):
      params, stats, opt = carry
      x, idx, w = xs
      y = labels[idx]
      if kind == "fwd":
        loss, stats = loss_fn(params, stats, x, y, w)
        return (params, stats, opt), loss
      (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, w)
      upd, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, upd), stats, opt), loss

    def run(v):
      c = (v["params"], v.get("batch_stats", {}), tx.init(v["params"]))
      return jax.lax.scan(body, c, (fixed_x, plan.idx, plan.weight))

    def wrapped(v):
      if kind == "nobn":
        orig = resnet.BatchNorm.__call__
        resnet.BatchNorm.__call__ = lambda self, x, train, mask=None: x.astype(self.dtype)
        try:
          return run(v)
        finally:
          resnet.BatchNorm.__call__ = orig
      return run(v)

    f = jax.jit(wrapped)
    jitted[piece] = (f, variables)
    return lambda: f(variables)

  pieces = [x for x in a.pieces.split(",") if x]
  jitted = {}
  fns, compile_s = {}, {}
  for pc in pieces:
    t0 = time.perf_counter()
    fns[pc] = build(pc)
    jax.block_until_ready(fns[pc]())
    compile_s[pc] = time.perf_counter() - t0
    print(pc, f"compiled {compile_s[pc]:.1f}s", flush=True)
  times = {pc: [] for pc in pieces}
  for _ in range(a.repeats):
    for pc in pieces:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[pc]())
      times[pc].append(time.perf_counter() - t0)
  med = {pc: statistics.median(v) for pc, v in times.items()}
  ref = next((med[x] for x in pieces if x.startswith("full@shift:fp32")), None)
  print(f"{'piece':22s} {'ms/step':>8s} {'share of full@shift:fp32':>25s}")
  for pc in pieces:
    share = f"{med[pc] / ref:.2f}" if ref else ""
    print(f"{pc:22s} {1e3 * med[pc] / steps:8.2f} {share:>25s}")
  res = dict(
    shapes=dict(n=n, batch=batch, steps=steps, width=a.width, hw=s["hw"]),
    load_average=list(os.getloadavg()),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    jax=jax.__version__,
    ms_per_step={pc: 1e3 * med[pc] / steps for pc in pieces},
    times_s=times,
    compile_s=compile_s,
  )
  if a.trace:
    f, v = jitted[a.trace]
    res["trace"] = dict(piece=a.trace, **trace_ops(f, v, steps))
    print(f"\n{a.trace}, op by op (ms per local step):")
    for k, ms in res["trace"]["by_category"].items():
      print(f"  {ms:7.2f}  {k}")
    for row in res["trace"]["top_ops"][:25]:
      print(f"  {row['ms_per_step']:7.2f}  {row['op']:28s} {row['source']}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)
  return res


def _hlo_sources(hlo_text: str) -> dict:
  """HLO instruction name -> the JAX op it came from (``op_name`` metadata, ``jit(...)/`` cut)."""
  import re  # pylint: disable=g-import-not-at-top

  out = {}
  for m in re.finditer(r"^\s+%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
    out[m.group(1)] = m.group(2).split("/while/body/", 1)[-1]
  return out


def _category(op: str, source: str) -> str:
  """``forward|backward conv|bn|other: <HLO kind>`` for one traced instruction."""
  import re  # pylint: disable=g-import-not-at-top

  phase = "backward" if "transpose(jvp(" in source else "forward" if "jvp(" in source else "other"
  m = re.search(r"/((?:downsample_)?conv\d*|(?:downsample_)?bn\d*|classifier)/", source + "/")
  layer = "" if not m else "conv" if "conv" in m.group(1) else "bn" if "bn" in m.group(1) else "fc"
  kind = re.sub(r"[._]?\d+$", "", op)
  kind = {
    "conv_general_dilated": "convolution (Eigen)",
    "ynn_fusion": "YNNPACK fusion",
    "ffi_call": "convolution (oneDNN custom call)",
  }.get(kind, "transpose" if kind.startswith("transpose") else "elementwise / reduction")
  return f"{phase} {layer or 'other'}: {kind}"


def trace_ops(f, v, steps: int, repeats: int = 3) -> dict:
  """Runs ``f(v)`` ``repeats`` times under ``jax.profiler.trace`` and adds up XLA:CPU's per-thunk
  events by HLO instruction: ms per local step per op (with the JAX op each came from) and per
  category (forward / backward x conv / BN x Eigen convolution, YNNPACK fusion, transpose,
  other fusions)."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob
  import gzip
  import tempfile

  import jax  # pylint: disable=g-import-not-at-top

  sources = _hlo_sources(f.lower(v).compile().as_text())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(repeats):
        jax.block_until_ready(f(v))
    (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as fh:
      events = json.load(fh)["traceEvents"]
  per_op = collections.Counter()
  for e in events:
    name = e.get("name", "")
    # A while/conditional/call event spans the instructions inside it: counted there.
    if (
      e.get("ph") == "X"
      and name in sources
      and not name.startswith(("while", "conditional", "call"))
    ):
      per_op[e["name"]] += e["dur"] / 1e3 / (repeats * steps)  # us -> ms per step
  cats = {op: _category(op, sources[op]) for op in per_op}
  by_cat = collections.Counter()
  for op, ms in per_op.items():
    by_cat[cats[op]] += ms
  return dict(
    traced_ms_per_step=sum(per_op.values()),
    by_category=dict(sorted(by_cat.items(), key=lambda x: -x[1])),
    top_ops=[
      dict(op=op, ms_per_step=ms, source=sources[op], category=cats[op])
      for op, ms in per_op.most_common()
    ],
  )


if __name__ == "__main__":
  main()
