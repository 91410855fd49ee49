"""Oracles for fedllava.evaluate: hand-computed group accuracies and confusion invariants."""

import numpy as np
import pytest
from conftest import three_class_example

from fedllava import evaluate

_three_class_example = three_class_example


def test_three_class_by_hand():
  labels, preds, counts = _three_class_example()
  r = evaluate.classification_report(labels, preds, 3, counts)
  # Correct: class 0 -> 3 of 4, class 1 -> 2 of 4, class 2 -> 1 of 4; 6 of 12 overall.
  assert r["top1"] == pytest.approx(100 * 6 / 12)
  assert r["per_class"] == pytest.approx([75.0, 50.0, 25.0])
  assert r["many"] == pytest.approx(75.0)
  assert r["medium"] == pytest.approx(50.0)
  assert r["few"] == pytest.approx(25.0)
  assert (r["num_classes_many"], r["num_classes_medium"], r["num_classes_few"]) == (1, 1, 1)
  # Balanced test set: top-1 equals the mean per-class accuracy.
  assert r["mean_per_class"] == pytest.approx(r["top1"])
  expected = np.array([[3, 1, 0], [1, 2, 1], [2, 1, 1]])
  np.testing.assert_array_equal(r["confusion"], expected)
  assert r["num_examples"] == 12


def test_confusion_rows_sum_to_class_counts():
  rng = np.random.default_rng(0)
  c = 7
  labels = rng.integers(0, c, size=500)
  preds = np.where(rng.random(500) < 0.6, labels, rng.integers(0, c, size=500))
  r = evaluate.classification_report(labels, preds, c, [200] * c)
  conf = r["confusion"]
  assert conf.shape == (c, c)
  np.testing.assert_array_equal(conf.sum(axis=1), np.bincount(labels, minlength=c))
  np.testing.assert_array_equal(conf.sum(axis=0), np.bincount(preds, minlength=c))
  assert r["top1"] == pytest.approx(100 * np.mean(labels == preds))
  assert r["many"] == pytest.approx(r["mean_per_class"])
  assert r["medium"] is None and r["few"] is None


def test_group_boundaries_and_missing_classes():
  # 101 -> many, 100 and 20 -> medium (inclusive), 19 -> few; no test example of class 3.
  labels = [0, 1, 1, 2, 2]
  preds = [0, 1, 0, 0, 0]
  r = evaluate.classification_report(labels, preds, 4, [101, 100, 20, 19])
  assert (r["num_classes_many"], r["num_classes_medium"], r["num_classes_few"]) == (1, 2, 1)
  assert r["per_class"][:3] == pytest.approx([100.0, 50.0, 0.0])
  assert r["per_class"][3] is None
  assert r["medium"] == pytest.approx((50.0 + 0.0) / 2)
  assert r["few"] is None  # its only class has no test example: None, not NaN or 0
  # Unbalanced test set: top-1 (per example) differs from the mean per-class accuracy.
  assert r["top1"] == pytest.approx(100 * 2 / 5)
  assert r["mean_per_class"] == pytest.approx(50.0)


def test_validation_errors():
  with pytest.raises(ValueError, match="differ in length"):
    evaluate.classification_report([0, 1], [0], 2, [1, 1])
  with pytest.raises(ValueError, match=r"labels\[1\] = 5 is outside \[0, 3\)"):
    evaluate.classification_report([0, 5], [0, 1], 3, [1, 1, 1])
  with pytest.raises(ValueError, match="preds"):
    evaluate.classification_report([0, 1], [0, -1], 3, [1, 1, 1])
  with pytest.raises(ValueError, match="train_class_counts"):
    evaluate.classification_report([0, 1], [0, 1], 3, [1, 1])
  with pytest.raises(ValueError, match="empty"):
    evaluate.classification_report([], [], 3, [1, 1, 1])
  with pytest.raises(ValueError, match="integer"):
    evaluate.classification_report([0.5, 1], [0, 1], 3, [1, 1, 1])


def test_row_normalise():
  conf = np.array([[3, 1, 0], [0, 0, 0], [2, 1, 1]])
  norm = evaluate.row_normalise(conf)
  np.testing.assert_allclose(norm.sum(axis=1), [1.0, 0.0, 1.0])
  np.testing.assert_allclose(norm[0], [0.75, 0.25, 0.0])
