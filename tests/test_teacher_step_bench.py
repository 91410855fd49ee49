"""The teacher benchmark script runs end to end on a tiny model and writes its JSON."""

import json
import os
import sys

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
    for n in ("clip_forward", "llm_forward", "dwp_grad_remat_on", "dwp_grad_remat_off"):
      assert (b, n) in names
  for r in res["runs"]:
    assert "error" not in r, r
    assert r["tokens_per_s"] > 0 and r["model_flops"] > 0 and r["step_s_median"] > 0
    assert r["compile_s"] > 0
  fwd = [r for r in res["runs"] if r["name"] == "llm_forward" and r["batch"] == 2][0]
  grad = [r for r in res["runs"] if r["name"] == "dwp_grad_remat_on" and r["batch"] == 2][0]
  assert fwd["tokens"] == 2 * 24 and grad["model_flops"] == 2 * fwd["model_flops"]
