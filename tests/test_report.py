"""fedllava.report: the text tables and PNG figures of a run (written atomically)."""

import os

import numpy as np
import pytest
from conftest import three_class_example

from fedllava import evaluate, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
  assert os.path.getsize(path) > 0
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]
  assert not leftovers, leftovers


_three_class_example = three_class_example


def test_format_report():
  labels, preds, counts = _three_class_example()
  r = evaluate.classification_report(labels, preds, 3, counts)
  text = report.format_report(r, class_names=["cat", "dog", "emu"])
  assert "top-1" in text and "50.00" in text
  for g, acc in (("many", "75.00"), ("medium", "50.00"), ("few", "25.00")):
    line = next(s for s in text.splitlines() if s.strip().startswith(g))
    assert acc in line and " 1 " in line
  assert "emu" in text
  r2 = evaluate.classification_report([0, 1], [0, 1], 2, [500, 500])
  assert "n/a" in report.format_report(r2)
  big = evaluate.classification_report(np.arange(100), np.arange(100), 100, [50] * 100)
  assert len(report.format_report(big).splitlines()) < 20  # no 100 per-class lines


@pytest.mark.parametrize("num_classes", [3, 25, 100, 1000])
def test_save_confusion_png(tmp_path, num_classes):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, num_classes, size=3 * num_classes)
  preds = np.where(rng.random(labels.size) < 0.5, labels, rng.integers(0, num_classes, labels.size))
  conf = evaluate.classification_report(labels, preds, num_classes, [10] * num_classes)["confusion"]
  names = ["airplane", "automobile", "bird"] if num_classes == 3 else None
  path = tmp_path / "sub" / "confusion.png"
  report.save_confusion_png(conf, str(path), class_names=names)
  _assert_png(str(path))
  report.save_confusion_png(conf, str(path))  # overwrite in place
  _assert_png(str(path))


def test_save_confusion_png_rejects_non_square(tmp_path):
  with pytest.raises(ValueError, match="square"):
    report.save_confusion_png(np.zeros((2, 3)), str(tmp_path / "c.png"))


def test_save_curve_png(tmp_path):
  history = [{"round": r, "test/top1": 10.0 + r, "train/loss": 2.0 / (r + 1)} for r in range(5)]
  history.append({"round": 5, "train/loss": 0.3})  # a round without evaluation
  path = tmp_path / "curve.png"
  report.save_curve_png(history, str(path))
  _assert_png(str(path))
  acc_only = tmp_path / "acc.png"
  report.save_curve_png([{"step": 1, "test/top1": 3.0}], str(acc_only))
  _assert_png(str(acc_only))
  with pytest.raises(ValueError, match="empty"):
    report.save_curve_png([], str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="no accuracy or loss"):
    report.save_curve_png([{"round": 1, "lr": 0.1}], str(tmp_path / "x.png"))


def test_format_comparison_by_hand():
  base = {"top1": 50.0, "many": 90.0, "medium": 50.0, "few": 10.0}
  aligned = {"top1": 62.5, "many": 85.0, "medium": 60.0, "few": None}
  text = report.format_comparison([("fedavg", base), ("fedavg + alignment", aligned)])
  last = text.splitlines()[-1].split()
  assert last[-5:] == ["62.50", "85.00", "60.00", "n/a", "+12.50"]
  assert "fedavg + alignment" in text and "+12.50" in text and "+0.00" in text.splitlines()[2]


def test_comparison_figures(tmp_path):
  conf = np.array([[3, 1], [0, 4]])
  path = tmp_path / "cmp.png"
  report.save_confusion_comparison_png([("a", conf), ("b", conf.T)], str(path), ["x", "y"])
  _assert_png(str(path))
  curves = tmp_path / "curves.png"
  report.save_curves_comparison_png(
    [("fedavg", [(1, 10.0), (2, 20.0)]), ("+align", [(2, 30.0)])], str(curves)
  )
  _assert_png(str(curves))
