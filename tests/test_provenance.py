"""Stage keys (provenance.py): a stage reruns exactly when a field it depends on, or the result it
starts from, changed; a complete stage whose key holds is loaded; every decision is logged."""

import json
import os

import numpy as np
import pytest
from conftest import assert_same_tree as _assert_same
from conftest import file_mtimes as _mtimes
from conftest import tiny_digits

from fedllava import main, provenance

_NO_TEACHER = {"align.beta": 0.0, "align.teacher": ""}


def _tiny(rounds, **overrides):
  return tiny_digits(rounds, **{**_NO_TEACHER, **overrides})


def _log(workdir):
  with open(os.path.join(workdir, "resume_log.json")) as f:
    return json.load(f)["resumed"]


# ---- keys: which fields reach which stage (no training) ----
def test_a_later_stages_field_never_reaches_an_earlier_stages_key():
  base = tiny_digits(2, stages="pretrain,federate,align")
  later_only = {
    "pretrain": {"fl.learning_rate": 0.5, "align.beta": 0.5, "align.learning_rate": 0.5},
    "federate": {"align.learning_rate": 0.5, "align.epochs": 9, "align.beta": 0.5},
    "annotate": {"pretrain.learning_rate": 0.5, "pretrain.epochs": 9, "fl.rounds": 9},
  }
  for stage, changes in later_only.items():
    changed = tiny_digits(2, stages="pretrain,federate,align", **changes)
    assert provenance.fields(base, stage) == provenance.fields(changed, stage), stage
  # ... while a field of the stage itself does, and "how long / how often / where" does not.
  own = {
    "annotate": {"pretrain.annotate.max_new_tokens": 7},
    "pretrain": {"pretrain.learning_rate": 0.5, "model.width": 4},
    "federate": {"fl.learning_rate": 0.5, "data.imbalance_factor": 50.0, "model.width": 4},
    "align": {"align.learning_rate": 0.5, "data.imbalance_factor": 50.0},
  }
  for stage, changes in own.items():
    for field, value in changes.items():
      changed = tiny_digits(2, stages="pretrain,federate,align", **{field: value})
      assert provenance.fields(base, stage) != provenance.fields(changed, stage), (stage, field)
  for field, value in {"fl.rounds": 9, "checkpoint.every": 3, "mesh.num_devices": 1}.items():
    changed = tiny_digits(2, **{field: value})
    for stage in ("federate", "align"):
      assert provenance.fields(tiny_digits(2), stage) == provenance.fields(changed, stage)


def test_another_methods_hyperparameters_never_reach_stage_2s_key():
  """A run keys only its own method's ``config.fl.<section>``: adding or changing CReFF's DSA
  field must not redo a finished FedAvg or CCVR run (it did: every method was redone when
  ``fl.creff.dsa`` was added). CLIP2FL reads ``fl.creff`` too, FedYogi reads ``fl.fedadam``.
  Catches: the filter left out (the first assertion fails), or a method's own section dropped."""
  change = {"fl.creff.dsa": False}
  for algo in ("fedavg", "ccvr", "fedbe"):
    a, b = (
      tiny_digits(2, **{"fl.algorithm": algo}),
      tiny_digits(2, **{"fl.algorithm": algo}, **change),
    )
    assert provenance.fields(a, "federate") == provenance.fields(b, "federate"), algo
  for algo, field, value in [
    ("creff", "fl.creff.dsa", False),
    ("clip2fl", "fl.creff.dsa", False),
    ("fedyogi", "fl.fedadam.learning_rate", 0.5),
    ("ccvr", "fl.ccvr.num_virtual", 7),
    ("fedavg", "fl.dp.enabled", True),  # not a method's section: every method reads it
  ]:
    a = tiny_digits(2, **{"fl.algorithm": algo})
    b = tiny_digits(2, **{"fl.algorithm": algo, field: value})
    assert provenance.fields(a, "federate") != provenance.fields(b, "federate"), (algo, field)


def test_every_round_alignment_is_part_of_stage_2s_key_and_the_holdout_too():
  every = {"align.when": "every_round"}
  a = tiny_digits(2, **every)
  b = tiny_digits(2, **every, **{"align.learning_rate": 0.5})
  assert provenance.fields(a, "federate") != provenance.fields(b, "federate")
  # the side-by-side baseline trains without the alignment: align fields never reach it
  assert provenance.fields(a, "federate_plain") == provenance.fields(b, "federate_plain")
  assert provenance.fields(tiny_digits(2), "federate") != provenance.fields(
    tiny_digits(2, **{"align.per_class": 5}), "federate"
  )


def test_prepare_sets_a_stale_stage_aside_and_logs_why(tmp_path):
  workdir = str(tmp_path)
  cfg = tiny_digits(2)
  key = provenance.key(cfg, "align", "fp-1")
  stage_dir = tmp_path / "align"
  stage_dir.mkdir()
  (stage_dir / "report.json").write_text("{}")
  provenance.write(str(stage_dir), key, "result-1")
  provenance.prepare(workdir, "align", key)  # same key: kept
  assert (stage_dir / "report.json").exists()
  provenance.prepare(workdir, "align", provenance.key(cfg, "align", "fp-2"))  # new upstream
  assert not stage_dir.exists()
  (moved,) = os.listdir(tmp_path / "superseded")
  assert (tmp_path / "superseded" / moved / "report.json").exists()
  (entry,) = _log(workdir)
  assert entry["stage"] == "align" and "built on changed" in entry["redone"]
  # an unreadable record is redone too; a directory without output is reused as it is
  stage_dir.mkdir()
  (stage_dir / "report.json").write_text("{}")
  (stage_dir / provenance.STAGE_FILE).write_bytes(b"\x00\xff garbage")
  provenance.prepare(workdir, "align", key)
  assert not stage_dir.exists() and "cannot be read" in _log(workdir)[-1]["redone"]
  stage_dir.mkdir()
  provenance.prepare(workdir, "align", key)
  assert stage_dir.exists()


# ---- the chain: raising fl.rounds, changing an align field ----
def test_more_rounds_rerun_alignment_and_an_align_field_reruns_stage_3_alone(tmp_path):
  """Mutations caught: stage 3 "complete; loaded" after stage 2 continued to more rounds (it
  aligned the old model); a changed align field refused, or rerunning stage 2 too."""
  w = str(tmp_path / "w")
  main.run(_tiny(2), w)
  resumed = main.run(_tiny(3), w)  # stage 2 continues to round 3; stage 3 must follow it
  straight = main.run(_tiny(3), str(tmp_path / "straight"))
  _assert_same(resumed["federate"].variables, straight["federate"].variables)
  _assert_same(resumed["align"].variables, straight["align"].variables)
  assert resumed["align"].report["before"]["top1"] == resumed["federate"].report["final"]["top1"]
  redone = [e for e in _log(w) if "stage" in e]
  assert [e["stage"] for e in redone] == ["align"] and "built on changed" in redone[0]["redone"]
  report = json.loads((tmp_path / "w" / "report.json").read_text())
  assert report["rows"][1]["top1"] == straight["align"].report["final"]["top1"]

  # A changed align field: stage 3 reruns on the complete stage 2, which is not touched.
  federate_files = _mtimes(tmp_path / "w" / "federate")
  changed = main.run(_tiny(3, **{"align.epochs": 2}), w)
  assert _mtimes(tmp_path / "w" / "federate") == federate_files
  fresh = main.run(_tiny(3, **{"align.epochs": 2}), str(tmp_path / "fresh"))
  _assert_same(changed["align"].variables, fresh["align"].variables)
  last = _log(w)[-1]
  assert last["stage"] == "align" and "align.epochs: 1 -> 2" in last["redone"]
  assert len(os.listdir(tmp_path / "w" / "superseded")) == 2


def test_the_fix_a_stage_3_error_suggests_is_accepted_and_reuses_stage_2(tmp_path):
  """Mutation caught: the rerun with the suggested fix refused as "a different config" (the
  whole-config guard), or stage 2 rerun for a field of stage 3."""
  w = str(tmp_path)
  with pytest.raises(FloatingPointError, match="config.align.learning_rate"):
    main.run(_tiny(2, **{"align.learning_rate": 1e30, "align.params": "all"}), w)
  federate_files = _mtimes(tmp_path / "federate")
  fixed = main.run(_tiny(2, **{"align.learning_rate": 0.05, "align.params": "all"}), w)
  assert _mtimes(tmp_path / "federate") == federate_files
  assert np.isfinite(fixed["align"].report["final"]["top1"])
  assert "align.learning_rate" in _log(w)[-1]["redone"]
