"""The stage chain (main.run): handoffs, resume after a kill, complete stages not rerun, and
alignment's measured effect on digits-LT IF=100."""

import os
import sys

import numpy as np
import pytest
from conftest import assert_same_tree as _assert_same
from conftest import file_mtimes as _mtimes
from conftest import tiny_digits

from fedllava import align, federate, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits_lt  # noqa: E402  pylint: disable=g-import-not-at-top

_tiny = tiny_digits


def test_chain_with_a_clip_teacher_killed_after_stage_2_resumes_to_the_same_result(
  tmp_path, monkeypatch, tiny_clip_dir
):
  cfg = _tiny(**{"align.teacher": tiny_clip_dir, "align.beta": 1.0, "align.params": "all"})
  straight = main.run(cfg, str(tmp_path / "a"))
  assert straight["align"].report["losses"]["align/kl"] > 0  # q reached the loss

  def killed(*a, **k):
    raise KeyboardInterrupt("simulated kill after stage 2")

  monkeypatch.setattr(align, "run", killed)
  with pytest.raises(KeyboardInterrupt):
    main.run(cfg, str(tmp_path / "b"))
  monkeypatch.undo()
  assert (tmp_path / "b" / "federate" / "report.json").exists()
  assert not (tmp_path / "b" / "align" / "report.json").exists()
  federate_files = _mtimes(tmp_path / "b" / "federate")
  resumed = main.run(cfg, str(tmp_path / "b"))
  _assert_same(straight["align"].variables, resumed["align"].variables)
  assert straight["align"].report["final"]["top1"] == resumed["align"].report["final"]["top1"]
  # The complete stage 2 was loaded, not rerun: none of its files was rewritten.
  assert _mtimes(tmp_path / "b" / "federate") == federate_files
  # And a third run rewrites no stage output at all.
  stage_files = {**_mtimes(tmp_path / "b" / "federate"), **_mtimes(tmp_path / "b" / "align")}
  again = main.run(cfg, str(tmp_path / "b"))
  assert {
    **_mtimes(tmp_path / "b" / "federate"),
    **_mtimes(tmp_path / "b" / "align"),
  } == stage_files
  _assert_same(again["align"].variables, straight["align"].variables)
  for name in ("report.json", "report.txt", "confusion_comparison.png", "accuracy_comparison.png"):
    assert (tmp_path / "b" / name).exists(), name


def test_every_round_alignment_reaches_the_clients_and_resumes(tmp_path, monkeypatch):
  cfg = _tiny(3, **{"align.when": "every_round"})
  straight = main.run(cfg, str(tmp_path / "a"))
  plain, aligned = straight["federate_plain"], straight["federate"]
  # The plain baseline equals stage 2 alone on the same pool (D_align held out, as 'align' is
  # in config.stages); the aligned run differs from it.
  alone = federate.run(cfg, str(tmp_path / "alone"))
  _assert_same(plain.variables, alone.variables)
  for run in (plain, aligned):
    assert run.report["d_align_held_out"] == 100
    assert run.report["train_pool_size"] == alone.report["train_pool_size"]
  head = lambda v: np.asarray(v["params"]["classifier"]["kernel"])  # noqa: E731
  assert not np.array_equal(head(plain.variables), head(aligned.variables))
  # Killed in round 3 of the aligned run: the resumed run replays the per-round alignment.
  from fedllava.federate import rounds

  real = rounds.sample_clients
  calls = []

  def crash(seed, r, *a):
    calls.append(r)
    if r == 2 and len(calls) > 3:  # the baseline's three rounds pass, the aligned run's third dies
      raise KeyboardInterrupt("simulated kill")
    return real(seed, r, *a)

  monkeypatch.setattr(rounds, "sample_clients", crash)
  with pytest.raises(KeyboardInterrupt):
    main.run(cfg, str(tmp_path / "b"))
  monkeypatch.undo()
  resumed = main.run(cfg, str(tmp_path / "b"))
  _assert_same(resumed["federate"].variables, aligned.variables)
  assert resumed["align"].report["when"] == "every_round"


def test_alignment_raises_few_class_accuracy_on_digits_lt_if100(tmp_path):
  """README, "Stage 3 on digits-LT IF=100": FedAvg's few classes 0.0% -> 31.2% after alignment
  (20 rounds, width 8, 2 local epochs, seed 7; beta = 0, head only, D_align = 10 per class)."""
  cfg = digits_lt.get_config("if=100")
  cfg.fl.rounds = 20
  cfg.model.width = 8
  cfg.fl.local_epochs = 2
  cfg.checkpoint.every = 20
  out = main.run(cfg, str(tmp_path))
  before = out["federate"].report["final"]
  after = out["align"].report["final"]
  assert before["few"] < 5.0
  assert after["few"] > before["few"] + 20.0
  assert after["top1"] > before["top1"]
