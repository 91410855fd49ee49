"""The seeds harness (fedllava/sweep.py): methods x seeds as ordinary runs, one table.

One tiny sweep (digits-LT, 2 rounds, fedavg + fedprox + ours, 2 seeds) is killed after its first
run and rerun; the tests read what it left. The paper column is tested on fake per-run results
(no CIFAR)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, tiny_digits

from fedllava import errors, main, paper_tables, sweep

METHODS = ["fedavg", "fedprox"]
SEEDS = [0, 1]
METRICS = ("top1", "many", "medium", "few")


class _Killed(KeyboardInterrupt):
  pass


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """Runs the sweep, killed (Ctrl-C) as its second run starts, then reruns it to the end."""
  workdir = str(tmp_path_factory.mktemp("sweep"))
  cache = str(tmp_path_factory.mktemp("jax_cache"))  # the runs after the first compile nothing
  config = tiny_digits(2)
  real_run, calls = main.run, []

  def killed_after_one(c, run_dir, **kwargs):
    calls.append(run_dir)
    if len(calls) > 1:
      raise _Killed()
    return real_run(c, run_dir, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(main, "run", killed_after_one)
    with pytest.raises(_Killed):  # one by one: the runs of the together mode overlap
      sweep.run(config, METHODS, SEEDS, workdir, compile_cache=cache, runs_together=False)
  first = calls[0]
  mtimes = {
    os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
    for d, _, files in os.walk(first)
    for f in files
  }
  rerun = []

  def counted(c, run_dir, **kwargs):
    rerun.append(run_dir)
    return real_run(c, run_dir, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(main, "run", counted)
    table = sweep.run(config, METHODS, SEEDS, workdir, compile_cache=cache, runs_together=False)
  return dict(workdir=workdir, table=table, first=first, mtimes=mtimes, rerun=rerun)


def _run_report(workdir, row, seed):
  """The run's own report.json (written by main.run, not by the sweep): stage 2's row for a
  method, the aligned model's row for ours."""
  with open(os.path.join(workdir, row, f"seed{seed}", "report.json")) as f:
    rows = json.load(f)["rows"]
  if row == sweep.OURS:
    assert rows[-1]["model"].endswith("+ alignment")
    return rows[-1]
  assert rows[0]["model"] == row
  return rows[0]


def test_table_is_mean_and_std_over_the_runs_own_reports(swept):
  """Mean and sample std per row and metric, recomputed with numpy from each run's report.json.

  Catches: population instead of sample std (ddof=0), a seed's run missing or read twice, a row
  reading another row's run, the ours row reporting stage 2 instead of the alignment stage."""
  workdir, table = swept["workdir"], swept["table"]
  with open(os.path.join(workdir, "table.json")) as f:
    assert json.load(f) == json.loads(json.dumps(table))
  assert [r["row"] for r in table["rows"]] == METHODS + [sweep.OURS]
  assert table["rows"][-1]["label"] == "fedavg + alignment (beta=0, no pretraining)"
  for r in table["rows"]:
    assert r["seeds"] == SEEDS
    for k in METRICS:
      values = [_run_report(workdir, r["row"], s)[k] for s in SEEDS]
      np.testing.assert_allclose(r[k]["per_seed"], values, rtol=1e-12)
      np.testing.assert_allclose(r[k]["mean"], np.mean(values), rtol=1e-12)
      np.testing.assert_allclose(r[k]["std"], np.std(values, ddof=1), rtol=1e-12, atol=1e-12)
    assert len(r["wall_s"]["per_seed"]) == 2 and all(w > 0 for w in r["wall_s"]["per_seed"])
    assert r["paper"] is None  # digits is not one of the paper's data sets
  md = open(os.path.join(workdir, "table.md")).read()
  fedprox = table["rows"][1]
  assert f"| fedprox | {fedprox['top1']['mean']:.2f} ± {fedprox['top1']['std']:.2f} |" in md
  assert "paper" not in md.split("\n")[2]  # no paper column off the paper's data sets
  with open(os.path.join(workdir, "table.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_killed_sweep_resumes_without_touching_completed_runs(swept):
  """Killed as its second run started, the rerun runs the other five and never reopens the first.

  Catches: a completed run reopened (main.run called again: its report files rewritten) or
  rerun, a run skipped on resume."""
  assert swept["first"].endswith(os.path.join("fedavg", "seed0"))
  assert swept["first"] not in swept["rerun"]
  assert len(swept["rerun"]) == len(SEEDS) * (len(METHODS) + 1) - 1
  now = {p: os.stat(p).st_mtime_ns for p in swept["mtimes"]}
  assert now == swept["mtimes"]
  for d, _, files in os.walk(swept["first"]):  # nothing new either
    assert {os.path.join(d, f) for f in files} <= set(swept["mtimes"])


def test_runs_together_give_the_same_table_as_one_by_one(swept, tmp_path, monkeypatch):
  """The default sweep runs each row's seeds as one program (multirun.run_many, once a row);
  its table (every metric's per-seed values, mean and std) is the one-by-one sweep's.

  Catches: a seed's run handed another run's lane, a row not run together, records mixed up."""
  from fedllava.federate import multirun

  real, together = multirun.run_many, []

  def spy(configs, workdirs, **kwargs):
    together.append([c.seed for c in configs])
    return real(configs, workdirs, **kwargs)

  monkeypatch.setattr(multirun, "run_many", spy)
  table = sweep.run(tiny_digits(2), METHODS, SEEDS, str(tmp_path / "sweep"))
  assert together == [SEEDS] * (len(METHODS) + 1)
  want = swept["table"]["rows"]
  assert [r["row"] for r in table["rows"]] == [r["row"] for r in want]
  for a, b in zip(want, table["rows"]):
    for k in METRICS:
      assert a[k] == b[k], (a["row"], k)


def test_an_unknown_method_is_refused_up_front_listing_the_known_ones(tmp_path):
  workdir = str(tmp_path / "sweep")
  with pytest.raises(errors.ConfigError) as e:
    sweep.run(tiny_digits(2), ["fedavg", "fedxyz"], [0], workdir)
  assert str(e.value) == (
    f"--methods names unknown method(s) ['fedxyz']; the known ones are "
    f"{list(sweep.algorithms.ALGORITHMS)}."
  )
  assert not os.path.exists(workdir)


def test_cli_unknown_method_and_misspelt_field_are_one_line(tmp_path):
  def cli(*args):
    return subprocess.run(
      [sys.executable, "-m", "fedllava.sweep", "--config=configs/digits_lt.py", *args],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True,
      text=True,
      timeout=300,
    )

  out = cli("--methods=fedavg,fedxyz", f"--workdir={tmp_path / 'a'}")
  assert out.returncode == 1
  assert out.stderr.strip().startswith(
    "fedllava: ConfigError: --methods names unknown method(s) ['fedxyz']; the known ones are "
    "['fedavg', "
  )
  out = cli("--methods=fedavg", "--config.fl.roundz=2", f"--workdir={tmp_path / 'b'}")
  assert out.returncode == 1
  assert out.stderr.strip() == (
    "fedllava: --config.fl.roundz: the config has no field 'roundz'. Did you mean 'rounds'?"
  )
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def _fake_records(rows, seeds, top1):
  return {
    (r["row"], s): {
      "metrics": {"top1": top1 + s, "many": 90.0, "medium": 50.0, "few": 10.0 + s},
      "wall_s": 1.0,
    }
    for r in rows
    for s in seeds
  }


def test_paper_column_on_a_paper_data_set():
  """A CIFAR-10-LT IF 100 table shows Table 2's 56.17 next to fedavg's top-1 and 75.49 next to
  ours; off the paper's settings (IF 20) there is no paper column; ImageNet-LT shows Table 3's
  many/medium/few too. Catches: the paper column on the wrong row, dataset or IF."""
  from configs import cifar10_lt, imagenet_lt

  config = cifar10_lt.get_config()
  rows = sweep.plan(config, ["fedavg", "fedprox"])
  table = sweep.summarize(config, rows, [0, 1], _fake_records(rows, [0, 1], 50.0))
  md = sweep.format_markdown(table).split("\n")
  assert md[2].startswith("| row | top-1 | paper top-1 | many | medium | few |")
  assert md[4].startswith("| fedavg | 50.50 ± 0.71 | 56.17 | 90.00 ± 0.00 |")
  assert md[5].startswith("| fedprox | 50.50 ± 0.71 | 56.92 |")
  assert md[6].startswith("| fedavg + alignment (beta=1, no pretraining) | 50.50 ± 0.71 | 75.49 |")
  assert table["rows"][0]["paper"] == {"top1": 56.17}

  config.data.imbalance_factor = 20.0
  md = sweep.format_markdown(sweep.summarize(config, rows, [0], _fake_records(rows, [0], 50.0)))
  assert "paper" not in md

  config = imagenet_lt.get_config()
  rows = sweep.plan(config, ["fedavg"])
  md = sweep.format_markdown(sweep.summarize(config, rows, [0], _fake_records(rows, [0], 20.0)))
  lines = md.split("\n")
  assert lines[2].startswith("| row | top-1 | paper top-1 | many | paper many | medium |")
  assert lines[4].startswith("| fedavg | 20.00 | 23.85 | 90.00 | 34.92 | 50.00 | 19.18 |")


# Three rows copied verbatim from the paper's text (Table 2 twice, Table 3 once).
_PAPER_LINES = {
  "fedprox": "\tFedProx\t56.92\t60.89\t76.53\t31.67\t36.30\t46.10",
  "fedfocal": "Imbalance-oriented FL methods\tFed-Focal Loss\t53.83\t57.42\t73.74\t30.67\t35.25\t45.52",
  "creff": "Classifier-retraining\tCRFF\t26.31\t37.44\t21.87\t10.29",
}
_PAPER_TXT = "/work/shared/paper/mllm-llava-fl.txt"
_PAPER_ROWS = {  # the paper's row names -> ours, for the whole-table check
  "FedAvg": "fedavg",
  "FedAvgM": "fedavgm",
  "FedProx": "fedprox",
  "FedDF": "feddf",
  "FedBE": "fedbe",
  "CCVR": "ccvr",
  "FedNova": "fednova",
  "Fed-Focal Loss": "fedfocal",
  "Ratio Loss": "ratioloss",
  "FedAvg+ τ -norm": "taunorm",
  "CReFF": "creff",
  "CRFF": "creff",
  "CLIP2FL": "clip2fl",
  "MLLM-LLaVA-FL": "ours",
}


def _numbers(line):
  return [float(x.split(" ")[0]) for x in line.split("\t")[-6:] if x[:1].isdigit()]


def test_paper_tables_match_the_paper_text():
  """Spot checks against rows copied from the text (FedProx and Fed-Focal Loss in Table 2,
  CReFF in Table 3); where the paper's text is at hand, every row of both tables.
  Catches: a typo or a swapped column in the transcription."""
  assert _numbers(_PAPER_LINES["fedprox"]) == [
    paper_tables.lookup("fedprox", d, f)["top1"]
    for d in ("cifar10", "cifar100")
    for f in (100, 50, 10)
  ]
  assert _numbers(_PAPER_LINES["fedfocal"]) == list(paper_tables.TABLE2["fedfocal"].values())
  assert _numbers(_PAPER_LINES["creff"]) == list(
    paper_tables.lookup("creff", "imagenet_lt", 1).values()
  )
  if not os.path.exists(_PAPER_TXT):
    pytest.skip(f"{_PAPER_TXT} not here: the spot checks above stand alone")
  text = open(_PAPER_TXT).read()
  t2 = text[text.index("Heterogeneity-oriented") : text.index("Table 2.")]
  t3 = text[text.index("Type\tMethod\tImageNet-LT") : text.index("Table 3.")]
  for block, table, width in ((t2, paper_tables.TABLE2, 6), (t3, paper_tables.TABLE3, 4)):
    seen = set()
    for line in block.split("\n"):
      cells = line.split("\t")
      if len(cells) < width + 1 or cells[-width - 1].strip() not in _PAPER_ROWS:
        continue
      name = _PAPER_ROWS[cells[-width - 1].strip()]
      assert [float(x.split(" ")[0]) for x in cells[-width:]] == list(table[name].values()), name
      seen.add(name)
    assert seen == set(table)
