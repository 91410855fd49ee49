"""ResNet-8's 3x3 convolutions one by one: fedllava's ``eigen_conv`` and ``onednn_conv``
against PyTorch, one core.

  taskset -c 0 python benchmarks/conv_cpu.py --out=benchmarks/results/conv_cpu_1core.json

For each 3x3 convolution shape of ``fl_round.py --preset=cpu_small`` (batch 32, width 16): the
forward alone and forward + both gradients, as a jitted ``lax.scan`` of ``--steps`` steps
(where XLA:CPU's slow paths show), ``jax`` = ``eigen_conv`` and ``onednn`` =
``onednn_conv.conv`` (when oneDNN is installed), against ``torch.nn.Conv2d`` (channels_last, 1
intra-op thread) on the same inputs; medians of ``--repeats`` interleaved repeats, ms per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# (spatial size, in channels, out channels, stride): ResNet-8 width 16 at 32x32.
SHAPES = [(32, 16, 16, 1), (32, 16, 32, 2), (16, 32, 32, 1), (16, 32, 64, 2), (8, 64, 64, 1)]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import torch

  from fedllava.models import onednn_conv, resnet

  torch.set_num_threads(1)
  fns = {}
  for hw, cin, cout, s in SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(0), (a.steps, a.batch, hw, hw, cin))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, cin, cout)) * 0.1

    def scans(conv, s=s):
      def body(w, xi):
        y, vjp = jax.vjp(lambda x, w: conv(x, w, s, 1), xi, w)
        dx, dw = vjp(y)
        return w - 1e-3 * dw, jnp.sum(dx)

      def fwd_body(w, xi):
        return w, jnp.sum(conv(xi, w, s, 1))

      fb = jax.jit(lambda w, x: jax.lax.scan(body, w, x))
      fw = jax.jit(lambda w, x: jax.lax.scan(fwd_body, w, x))
      return fw, fb

    fw, fb = scans(resnet.eigen_conv)
    tx = torch.randn(a.batch, cin, hw, hw).to(memory_format=torch.channels_last)
    tx.requires_grad_(True)
    conv = torch.nn.Conv2d(cin, cout, 3, s, 1, bias=False).to(memory_format=torch.channels_last)

    def t_fb(conv=conv, tx=tx):
      for _ in range(a.steps):
        y = conv(tx)
        y.backward(y)

    def t_fw(conv=conv, tx=tx):
      with torch.no_grad():
        for _ in range(a.steps):
          conv(tx)

    key = f"{hw}x{hw} {cin}->{cout} stride {s}"
    fns[key] = {
      "jax_forward": lambda fw=fw, w=w, x=x: jax.block_until_ready(fw(w, x)),
      "jax_forward_backward": lambda fb=fb, w=w, x=x: jax.block_until_ready(fb(w, x)),
      "torch_forward": t_fw,
      "torch_forward_backward": t_fb,
    }
    if onednn_conv.available():
      ow, ob = scans(onednn_conv.conv)
      fns[key]["onednn_forward"] = lambda ow=ow, w=w, x=x: jax.block_until_ready(ow(w, x))
      fns[key]["onednn_forward_backward"] = lambda ob=ob, w=w, x=x: jax.block_until_ready(ob(w, x))
    for f in fns[key].values():
      f()  # compile / warm up
  times = {k: {n: [] for n in v} for k, v in fns.items()}
  for _ in range(a.repeats):
    for k, v in fns.items():
      for n, f in v.items():
        t0 = time.perf_counter()
        f()
        times[k][n].append(1e3 * (time.perf_counter() - t0) / a.steps)
  ms = {k: {n: statistics.median(t) for n, t in v.items()} for k, v in times.items()}
  cols = [n for n in ("jax", "onednn", "torch") if f"{n}_forward" in next(iter(ms.values()))]
  print(f"{'shape':26s}" + "".join(f" {n + ' fwd':>11s} {n + ' f+b':>11s}" for n in cols))
  for k, v in ms.items():
    print(
      f"{k:26s}"
      + "".join(f" {v[n + '_forward']:11.2f} {v[n + '_forward_backward']:11.2f}" for n in cols)
    )
  totals = {n: sum(v[f"{n}_forward_backward"] for v in ms.values()) for n in cols}
  print("fwd + both grads, all five:", {n: round(t, 2) for n, t in totals.items()})
  res = dict(
    batch=a.batch,
    steps=a.steps,
    repeats=a.repeats,
    jax=jax.__version__,
    torch=torch.__version__,
    load_average=list(os.getloadavg()),
    ms_per_step=ms,
    forward_backward_total_ms=totals,
  )
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
