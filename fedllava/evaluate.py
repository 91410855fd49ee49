"""Classification metrics for long-tailed test sets: top-1, per-class, many/medium/few, confusion.

Groups follow the ImageNet-LT convention (Liu et al. 2019, "Large-scale long-tailed recognition in an
open world"), which the paper's Table 3 uses: a class is *many* with more than 100 training images,
*medium* with 20 to 100 (inclusive), *few* with fewer than 20. A group's accuracy is the mean of its
classes' accuracies.

Pure: predictions and labels in, metrics out (numpy only, no files); `fedllava.report` writes the
tables and figures.
"""

import numpy as np

MANY_MIN = 100  # many: count > MANY_MIN
FEW_MAX = 20  # few: count < FEW_MAX; medium: FEW_MAX <= count <= MANY_MIN
GROUPS = ("many", "medium", "few")


def _as_int_vector(x, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
  if a.size and not np.issubdtype(a.dtype, np.integer):
    if not (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a))):
      raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
  return a.astype(np.int64)


def _group_of(count: int) -> str:
  if count > MANY_MIN:
    return "many"
  if count >= FEW_MAX:
    return "medium"
  return "few"


def classification_report(labels, preds, num_classes: int, train_class_counts) -> dict:
  """Top-1, per-class and many/medium/few accuracy, and the confusion matrix.

  Args:
    labels: int array [N], true classes in [0, num_classes).
    preds: int array [N], predicted classes in [0, num_classes).
    num_classes: C.
    train_class_counts: length-C training images per class (the whole federation's long-tailed
      training set), which decides each class's group.

  Returns:
    A dict with `top1` (% of test examples classified correctly; on a balanced test set this equals
    the mean per-class accuracy), `mean_per_class` (%), `per_class` (list of C floats in %, None for a
    class with no test example), `many`/`medium`/`few` (% mean per-class accuracy over the group's
    classes that have test examples; None when there are none), `num_classes_many/medium/few`
    (classes per group by training count), `num_examples` (N) and `confusion` (int64 array [C, C],
    rows = true class, columns = predicted class).

  Raises:
    ValueError: on shape or length mismatches, an empty test set, or out-of-range classes.
  """
  num_classes = int(num_classes)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  labels = _as_int_vector(labels, "labels")
  preds = _as_int_vector(preds, "preds")
  if labels.shape != preds.shape:
    raise ValueError(f"labels and preds differ in length: {labels.size} vs {preds.size}")
  if labels.size == 0:
    raise ValueError("empty test set: labels and preds have no examples")
  for name, a in (("labels", labels), ("preds", preds)):
    bad = (a < 0) | (a >= num_classes)
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(
        f"{name}[{i}] = {a[i]} is outside [0, {num_classes}) ({int(bad.sum())} out-of-range values)"
      )
  counts = _as_int_vector(train_class_counts, "train_class_counts")
  if counts.size != num_classes:
    raise ValueError(f"train_class_counts has {counts.size} entries, expected {num_classes}")
  if (counts < 0).any():
    raise ValueError("train_class_counts must be non-negative")

  confusion = np.bincount(
    labels * num_classes + preds, minlength=num_classes * num_classes
  ).reshape(num_classes, num_classes)
  support = confusion.sum(axis=1)
  correct = np.diag(confusion)
  per_class = [
    100.0 * float(correct[c]) / float(support[c]) if support[c] else None
    for c in range(num_classes)
  ]
  seen = [a for a in per_class if a is not None]
  report = {
    "top1": 100.0 * float(correct.sum()) / float(labels.size),
    "mean_per_class": float(np.mean(seen)),
    "per_class": per_class,
    "num_examples": int(labels.size),
    "confusion": confusion,
  }
  groups = [_group_of(int(n)) for n in counts]
  for g in GROUPS:
    members = [c for c in range(num_classes) if groups[c] == g]
    accs = [per_class[c] for c in members if per_class[c] is not None]
    report[g] = float(np.mean(accs)) if accs else None
    report[f"num_classes_{g}"] = len(members)
  return report


def row_normalise(confusion) -> np.ndarray:
  """Divides each row of a confusion matrix by its sum.

  Args:
    confusion: array [C, C] of counts, rows = true class.

  Returns:
    float64 [C, C] whose rows sum to 1 (the diagonal is per-class recall); a row with no
    examples stays all zeros.
  """
  confusion = np.asarray(confusion)
  rows = confusion.sum(axis=1, keepdims=True).astype(np.float64)
  return np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
