"""The benchmark scripts run (tiny shapes) and write the fields the README table reads."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_fl_round_ci_preset(tmp_path):
  import importlib.util

  import fl_round  # pylint: disable=g-import-not-at-top

  has_torch = importlib.util.find_spec("torch") is not None
  out = tmp_path / "fl.json"
  contenders = ["jax:vmap@im2col:fp32", "jax:map@eigen:fp32", "jax:map@xla:bf16"]
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
