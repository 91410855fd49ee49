"""Oracles for fedllava.metrics: jsonl round trip, resume truncation, CSV, TensorBoard, NaN check."""

import csv
import glob
import json
import math
import os

import numpy as np
import pytest

from fedllava import metrics


def _tb_scalars(workdir):
  """Reads scalars back from workdir/tb as {tag: [(step, value)]} with TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(
    os.path.join(workdir, "tb"), size_guidance={event_accumulator.SCALARS: 0}
  )
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_imports_without_tensorflow():
  import importlib.util

  import tensorboardX  # noqa: F401  (the writer metrics.py uses)

  assert importlib.util.find_spec("tensorflow") is None


def test_jsonl_round_trip_and_csv(tmp_path):
  wd = str(tmp_path / "run")
  with metrics.MetricWriter(wd) as w:
    w.write(0, {"test/top1": 10.0})
    w.write(1, {"test/top1": 20.5, "train/loss": np.float32(1.25)})
    w.write(2, {"train/loss": 0.75})
    hist = w.history()
  assert [r["step"] for r in hist] == [0, 1, 2]
  assert hist[1]["test/top1"] == 20.5 and hist[1]["train/loss"] == 1.25
  assert all(isinstance(r["wall_time"], float) for r in hist)
  assert metrics.read_history(wd) == hist
  with open(os.path.join(wd, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["step", "wall_time", "test/top1", "train/loss"]
  assert [r["step"] for r in rows] == ["0", "1", "2"]
  assert rows[0]["train/loss"] == "" and float(rows[2]["train/loss"]) == 0.75
  with pytest.raises(ValueError, match="closed"):
    w.write(3, {"a": 1.0})


def test_tensorboard_events_read_back(tmp_path):
  wd = str(tmp_path / "run")
  with metrics.MetricWriter(wd) as w:
    for step in range(3):
      w.write(step, {"test/top1": 50.0 + step, "train/loss": 1.0 / (step + 1)})
  assert glob.glob(os.path.join(wd, "tb", "events.out.tfevents.*"))
  scalars = _tb_scalars(wd)
  assert [s for s, _ in scalars["test/top1"]] == [0, 1, 2]
  np.testing.assert_allclose([v for _, v in scalars["test/top1"]], [50.0, 51.0, 52.0])
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)


def test_resume_drops_later_steps(tmp_path):
  wd = str(tmp_path / "run")
  with metrics.MetricWriter(wd) as w:
    for step in range(5):  # the run logged up to step 4, its last checkpoint was step 2
      w.write(step, {"test/top1": float(step)})
  with metrics.MetricWriter(wd, resume_step=2) as w:
    assert [r["step"] for r in w.history()] == [0, 1, 2]
    w.write(3, {"test/top1": 30.0})
  hist = metrics.read_history(wd)
  assert [(r["step"], r["test/top1"]) for r in hist] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
  with open(os.path.join(wd, "metrics.csv"), newline="") as f:
    assert [r["step"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]
  # TensorBoard drops the orphaned steps 3 and 4 of the first run.
  assert _tb_scalars(wd)["test/top1"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
  # resume_step=-1: a fresh start drops everything; None keeps everything.
  with metrics.MetricWriter(wd) as w:
    assert len(w.history()) == 4
  with metrics.MetricWriter(wd, resume_step=-1) as w:
    assert w.history() == []


def test_torn_last_line_is_dropped(tmp_path):
  wd = str(tmp_path / "run")
  with metrics.MetricWriter(wd, tensorboard=False) as w:
    w.write(0, {"a": 1.0})
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 1, "a": ')  # killed mid-write
  assert [r["step"] for r in metrics.read_history(wd)] == [0]
  with metrics.MetricWriter(wd, tensorboard=False) as w:
    w.write(1, {"a": 2.0})
  assert [(r["step"], r["a"]) for r in metrics.read_history(wd)] == [(0, 1.0), (1, 2.0)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32("nan")])
def test_non_finite_raises(tmp_path, bad):
  wd = str(tmp_path / "run")
  with metrics.MetricWriter(wd) as w:
    w.write(0, {"train/loss": 1.0})
    with pytest.raises(FloatingPointError, match=r"'train/loss'.*step 7"):
      w.write(7, {"test/top1": 5.0, "train/loss": bad})
    assert [r["step"] for r in w.history()] == [0]  # nothing of step 7 was written


def test_bad_inputs(tmp_path):
  with metrics.MetricWriter(str(tmp_path), tensorboard=False) as w:
    with pytest.raises(ValueError, match="step"):
      w.write(-1, {"a": 1.0})
    with pytest.raises(ValueError, match="reserved"):
      w.write(0, {"step": 1.0})
    with pytest.raises(TypeError, match="not a scalar"):
      w.write(0, {"a": "x"})


def test_inactive_writer_checks_but_writes_nothing(tmp_path):
  wd = str(tmp_path / "run")
  with metrics.MetricWriter(wd, active=False) as w:
    w.write(0, {"a": 1.0})
    with pytest.raises(FloatingPointError):
      w.write(1, {"a": math.nan})
  assert not os.path.exists(wd)


@pytest.mark.parametrize("garbage", [b"\x00\x81\xfe\xff binary\n", b"not json\n", b"[1, 2]\n"])
def test_a_damaged_metrics_file_names_the_file_the_line_and_the_fix(tmp_path, garbage):
  from fedllava import errors

  good = json.dumps({"step": 1, "wall_time": 0.0, "a": 1.0}) + "\n"
  (tmp_path / metrics.JSONL).write_bytes(good.encode() + garbage + good.encode())
  with pytest.raises(errors.DamagedFileError) as e:
    metrics.MetricWriter(str(tmp_path), resume_step=1, tensorboard=False)
  message = str(e.value)
  assert message.startswith(f"{tmp_path / metrics.JSONL}:2 is not a metrics row (")
  assert "move it away and rerun" in message
