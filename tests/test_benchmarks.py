"""The benchmark scripts run (tiny shapes) and write the fields the README table reads."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_fl_round_ci_preset(tmp_path):
  import importlib.util

  import fl_round  # pylint: disable=g-import-not-at-top

  has_torch = importlib.util.find_spec("torch") is not None
  out = tmp_path / "fl.json"
  contenders = [
    "jax:vmap@im2col:fp32",
    "jax:map@eigen:fp32",
    "jax:map@onednn:fp32",
    "jax:map@xla:bf16",
  ]
  if has_torch:
    contenders += ["torch:creff", "torch:fast:fp32:t1", "pfl:fp32"]
  res = fl_round.main(
    [
      "--preset=ci",
      "--repeats=1",
      "--devices=1",
      f"--contenders={','.join(contenders)}",
      f"--out={out}",
    ]
  )
  saved = json.loads(out.read_text())
  assert saved["contenders"].keys() == set(contenders)
  assert saved["examples_per_round"] == 40 and saved["round_tflop"] > 0
  for name, r in saved["contenders"].items():
    if name.startswith("pfl") and "skipped" in r:  # pfl is optional: recorded with a reason
      assert r["skipped"]
      continue
    for field in ("s_per_round", "examples_per_s", "achieved_tflops", "pct_of_peak"):
      assert r[field] > 0, (name, field)
    assert r["peak_memory_bytes"] > 0
    if has_torch:
      assert r["speed_vs_best_torch"] > 0
  assert saved["contenders"]["jax:vmap@im2col:fp32"]["max_abs_diff_vs_first_jax_fp32"] == 0.0
  # conv_impl=eigen is another lowering of the same round (float32: a few ulps of drift)
  assert saved["contenders"]["jax:map@eigen:fp32"]["max_abs_diff_vs_first_jax_fp32"] < 1e-4
  assert saved["contenders"]["jax:map@onednn:fp32"]["max_abs_diff_vs_first_jax_fp32"] < 1e-4
  assert (tmp_path / "fl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert res["preset"] == "ci"


def test_resnet8_flops_by_hand():
  import fl_round  # pylint: disable=g-import-not-at-top

  # width 1, 4x4 input: stem 2*16*3*9, layer1 2*(2*16*9), layer2 (2x2) 2*4*(1*2*9 + 2*2*9 + 1*2),
  # layer3 (1x1) 2*(2*4*9 + 4*4*9 + 2*4), head 2*4*10.
  want = 864 + 576 + 8 * (18 + 36 + 2) + 2 * (72 + 144 + 8) + 80
  assert fl_round.resnet8_forward_flops(1, 4) == want
  assert fl_round.resnet8_train_flops(1, 4) == 3 * want
  # CReFF's ResNet-8 (width 64) on 32x32: ~0.39 GFLOP forward per image.
  assert 0.38e9 < fl_round.resnet8_forward_flops(64, 32) < 0.40e9


def test_fl_clients_ci_preset(tmp_path):
  """The clients sweep runs (digits over 40 clients, 4 and 40 a round, auto chunk size) and
  writes the fields the README's table reads."""
  import fl_clients  # pylint: disable=g-import-not-at-top

  out = tmp_path / "clients.json"
  res = fl_clients.main(["--preset=ci", "--repeats=1", f"--out={out}"])
  saved = json.loads(out.read_text())
  points = saved["datasets"]["digits"]["points"]
  assert [p["clients_per_round"] for p in points] == [4, 40]
  for p in points:
    for field in ("examples", "s_per_round", "s_per_example", "peak_memory_bytes"):
      assert p[field] > 0, field
    assert 1 <= p["group_size"] <= p["clients_per_round"]
    assert p["auto"]["budget_bytes"] > 0
    # A chunk runs its longest client's steps: never fewer client-iterations than needed.
    assert p["active_steps"] <= p["iterations"]
  assert "chunked:auto" in saved["datasets"]["digits"]["s_per_example_ratio_max_vs_min_clients"]
  assert (tmp_path / "clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert res["preset"] == "ci"


def test_chunk_iterations_by_hand():
  import fl_clients  # pylint: disable=g-import-not-at-top
  import numpy as np

  # Sorted [5, 3, 2, 2, 1]; chunks of 2: 2 x (5 + 2 + 1) = 16; one chunk (vmap): 5 x 5 = 25.
  assert fl_clients.chunk_iterations(np.array([2, 5, 1, 3, 2]), 2) == 16
  assert fl_clients.chunk_iterations(np.array([2, 5, 1, 3, 2]), 5) == 25


def test_fl_runs_ci_preset(tmp_path):
  """R runs as one program: the fields the README's runs table reads, one entry per R."""
  import fl_runs  # pylint: disable=g-import-not-at-top

  out = tmp_path / "runs.json"
  res = fl_runs.main(["--preset=ci", "--runs=1,3", "--repeats=1", "--devices=1", f"--out={out}"])
  saved = json.loads(out.read_text())
  assert saved == json.loads(json.dumps(res))
  assert saved["runs"] == [1, 3] and saved["seeds"] == [[0], [0, 1, 2]]
  assert len(saved["s_per_round"]) == len(saved["s_per_run_per_round"]) == 2
  for r, t, tr in zip(saved["runs"], saved["s_per_round"], saved["s_per_run_per_round"]):
    assert t > 0 and abs(tr - t / r) < 1e-12


def test_profile_trace_attributes_ops_to_their_jax_source():
  """``profile_cpu_round.trace_ops`` reads jax.profiler's per-instruction events back to the JAX
  op and layer each came from: a scan of a jvp-transposed convolution shows a backward conv."""
  import jax
  import jax.numpy as jnp
  import profile_cpu_round  # pylint: disable=g-import-not-at-top

  def loss(w, x):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(jnp.sin(y))

  def body(w, x):
    return w - 0.1 * jax.grad(loss)(w, x), None

  f = jax.jit(lambda w: jax.lax.scan(body, w, jnp.ones((3, 2, 8, 8, 4)))[0])
  w = jnp.ones((3, 3, 4, 4)) * 0.01
  jax.block_until_ready(f(w))
  res = profile_cpu_round.trace_ops(f, w, steps=3, repeats=2)
  assert res["traced_ms_per_step"] > 0
  sources = " ".join(r["source"] for r in res["top_ops"])
  assert "transpose(jvp(" in sources and "conv_general_dilated" in sources
  assert sum(res["by_category"].values()) == pytest.approx(res["traced_ms_per_step"])
  assert not any(r["op"].startswith("while") for r in res["top_ops"])  # spans its body: not added
  assert (
    profile_cpu_round._category(
      "ynn_fusion.3", "closed_call/transpose(jvp(ResNet))/layer3_0/conv1/conv_general_dilated"
    )
    == "backward conv: YNNPACK fusion"
  )
  assert (
    profile_cpu_round._category("add_rsqrt_fusion.2", "closed_call/jvp(ResNet)/layer1_0/bn2/rsqrt")
    == "forward bn: elementwise / reduction"
  )


def test_conv_cpu_runs_and_reports_every_shape(tmp_path):
  import conv_cpu  # pylint: disable=g-import-not-at-top

  out = tmp_path / "conv.json"
  res = conv_cpu.main(["--steps=1", "--repeats=1", "--batch=2", f"--out={out}"])
  assert json.load(open(out))["ms_per_step"] == res["ms_per_step"]
  assert len(res["ms_per_step"]) == len(conv_cpu.SHAPES)
  for v in res["ms_per_step"].values():
    assert set(v) == {
      "jax_forward",
      "jax_forward_backward",
      "onednn_forward",
      "onednn_forward_backward",
      "torch_forward",
      "torch_forward_backward",
    }
    assert all(t > 0 for t in v.values())
  assert set(res["forward_backward_total_ms"]) == {"jax", "onednn", "torch"}
