"""The benchmark scripts run (tiny shapes) and write the fields the README table reads."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import round_speed  # noqa: E402  pylint: disable=g-import-not-at-top


def test_round_speed_tiny(tmp_path):
  out = tmp_path / "r.json"
  res = round_speed.main(
    ["--preset=tiny", "--strategies=vmap,sequential", "--repeats=1", f"--out={out}"]
  )
  saved = json.loads(out.read_text())
  assert saved["strategies"].keys() == {"vmap", "sequential"}
  for r in saved["strategies"].values():
    assert r["s_per_round"] > 0 and r["speedup_vs_sequential"] > 0
    # Same round, two strategies: float32 drift only.
    assert r["max_abs_diff_vs_first_strategy"] < 1e-4
  assert res["local_steps_per_client"] == 3
