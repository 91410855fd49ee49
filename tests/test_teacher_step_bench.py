"""The teacher benchmark script runs end to end on a tiny model and writes its JSON."""

import json
import os
import sys

import pytest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)


def test_teacher_step_tiny(tmp_path):
  import teacher_step

  out = tmp_path / "teacher_step.json"
  teacher_step.main(["--size=tiny", "--batch=2", "--iters=2", f"--out={out}"])
  res = json.loads(out.read_text())
  for key in (
    "device_kind",
    "platform",
    "image_tokens",
    "text_tokens",
    "llm_matmul_params",
    "flops_formula",
    "runs",
  ):
    assert key in res
  assert res["image_tokens"] == 16 and res["text_tokens"] == 8
  names = {(r["batch"], r["name"]) for r in res["runs"]}
  for b in (2,):
    for n in (
      "clip_forward",
      "llm_forward",
      "dwp_grad_remat_on",
      "dwp_grad_remat_off",
      "dwp_step_alpha_lt1",
      "dwp_step_alpha1",
    ):
      assert (b, n) in names
  for r in res["runs"]:
    assert "error" not in r, r
    assert r["tokens_per_s"] > 0 and r["model_flops"] > 0 and r["step_s_median"] > 0
    assert r["compile_s"] > 0
  steps = {r["name"]: r for r in res["runs"] if r["name"].startswith("dwp_step")}
  for r in steps.values():
    assert r["images_per_s"] == pytest.approx(2 / r["step_s_median"])
    assert r["mfu"] is None  # CPU: no peak
    parts = r["flops_parts"]
    assert r["model_flops"] == parts["llm"] + parts["clip"] + parts["fl"] > 0
  # a = 1 skips CLIP: same LLM and g_fl FLOPs, no CLIP FLOPs
  lt1, one = steps["dwp_step_alpha_lt1"]["flops_parts"], steps["dwp_step_alpha1"]["flops_parts"]
  assert one["clip"] == 0 < lt1["clip"] and one["llm"] == lt1["llm"] and one["fl"] == lt1["fl"]
  fwd = [r for r in res["runs"] if r["name"] == "llm_forward" and r["batch"] == 2][0]
  grad = [r for r in res["runs"] if r["name"] == "dwp_grad_remat_on" and r["batch"] == 2][0]
  assert fwd["tokens"] == 2 * 24 and grad["model_flops"] == 2 * fwd["model_flops"]
