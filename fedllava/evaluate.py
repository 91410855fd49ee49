"""Classification metrics for long-tailed test sets: top-1, per-class, many/medium/few, confusion.

Groups follow the ImageNet-LT convention (Liu et al. 2019, "Large-scale long-tailed recognition in an
open world"), which the paper's Table 3 uses: a class is *many* with more than 100 training images,
*medium* with 20 to 100 (inclusive), *few* with fewer than 20. A group's accuracy is the mean of its
classes' accuracies.

Pure numpy and matplotlib (Agg, no display); every figure is written atomically (temporary file in
the target directory, then `os.replace`), so a killed run never leaves a half-written PNG.
"""

import math
from typing import Optional, Sequence

import numpy as np

from fedllava import fileio

MANY_MIN = 100  # many: count > MANY_MIN
FEW_MAX = 20  # few: count < FEW_MAX; medium: FEW_MAX <= count <= MANY_MIN
GROUPS = ("many", "medium", "few")
_ANNOTATE_MAX = 20  # annotate confusion cells up to this many classes
_TICKS_MAX = 30  # tick labels up to this many classes


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


def _fmt(x: Optional[float]) -> str:
  return "    n/a" if x is None else f"{x:7.2f}"


def format_report(report: dict, class_names: Optional[Sequence[str]] = None) -> str:
  """A fixed-width text table of a `classification_report`, to end a run's console output.

  Args:
    report: the dict `classification_report` returns.
    class_names: optional names for the per-class lines (shown for up to 30 classes; above that
      the five worst classes are listed).

  Returns:
    The table as a multi-line string (no trailing newline).
  """
  per_class = report["per_class"]
  num_classes = len(per_class)
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f"class_names has {len(class_names)} entries, expected {num_classes}")
  if class_names is not None:
    names = [str(n) for n in class_names]
  else:
    names = [f"class {c}" for c in range(num_classes)]
  lines = [
    f"Test accuracy (%) on {report['num_examples']} examples, {num_classes} classes",
    f"  {'group':<8}{'classes':>8}{'acc':>9}",
    f"  {'top-1':<8}{num_classes:>8}  {_fmt(report['top1'])}",
  ]
  for g in GROUPS:
    lines.append(f"  {g:<8}{report[f'num_classes_{g}']:>8}  {_fmt(report[g])}")
  lines.append(
    f"  (many: >{MANY_MIN} training images, medium: {FEW_MAX}-{MANY_MIN}, "
    f"few: <{FEW_MAX}; mean per-class acc {report['mean_per_class']:.2f})"
  )
  width = max(len(n) for n in names)
  if num_classes <= _TICKS_MAX:
    lines.append("  per class:")
    lines += [f"    {n:<{width}}  {_fmt(a)}" for n, a in zip(names, per_class)]
  else:
    ranked = sorted((a, c) for c, a in enumerate(per_class) if a is not None)[:5]
    lines.append("  worst classes:")
    lines += [f"    {names[c]:<{width}}  {_fmt(a)}" for a, c in ranked]
  return "\n".join(lines)


def _atomic_savefig(fig, path: str) -> None:
  """Saves a matplotlib figure as PNG to ``path`` atomically."""
  with fileio.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")


def _new_figure(width: float, height: float, dpi: int = 100):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)  # Agg: no display, no pyplot global state
  return fig


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


def save_confusion_png(confusion, path: str, class_names: Optional[Sequence[str]] = None) -> None:
  """Writes a two-panel confusion figure: raw counts and row-normalised rates.

  Row normalisation divides each row by its sum, so rows sum to 1 (a class with no test example
  stays a row of zeros). Cells are annotated for up to 20 classes; tick labels are shown for up to
  30, so the figure stays readable at 100 or 1000 classes.

  Args:
    confusion: array [C, C] of counts, rows = true class, columns = predicted class.
    path: where the PNG goes (written atomically).
    class_names: optional tick labels (used for up to 30 classes).
  """
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion must be square [C, C], got shape {confusion.shape}")
  num_classes = confusion.shape[0]
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f"class_names has {len(class_names)} entries, expected {num_classes}")
  normalised = row_normalise(confusion)

  small = num_classes <= _ANNOTATE_MAX
  # Each panel is ~4.5 inches wide: raise the resolution so every class keeps at least one pixel
  # (averaging 1000 rows into 450 pixels washes the diagonal out).
  fig = _new_figure(13.0, 6.0, dpi=max(100, math.ceil(num_classes / 4.5)))
  panels = ((confusion, "counts", None), (normalised, "row-normalised (recall)", (0.0, 1.0)))
  for i, (matrix, title, limits) in enumerate(panels):
    ax = fig.add_subplot(1, 2, i + 1)
    vmin, vmax = limits if limits else (0, max(1, matrix.max()))
    im = ax.imshow(matrix, cmap="Blues", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"{title}, {num_classes} classes")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if num_classes <= _TICKS_MAX:
      ticks = np.arange(num_classes)
      labels = list(class_names) if class_names is not None else [str(t) for t in ticks]
      ax.set_xticks(ticks, labels, rotation=90 if class_names is not None else 0, fontsize=8)
      ax.set_yticks(ticks, labels, fontsize=8)
    else:
      ax.set_xticks([])
      ax.set_yticks([])
    if small:
      fontsize = 8 if num_classes <= 10 else 6
      for (r, c), v in np.ndenumerate(matrix):
        text = f"{int(v)}" if limits is None else f"{v:.2f}"
        dark = v > 0.5 * vmax
        ax.text(
          c,
          r,
          text,
          ha="center",
          va="center",
          fontsize=fontsize,
          color="white" if dark else "black",
        )
  _atomic_savefig(fig, path)


def _is_accuracy_key(key: str) -> bool:
  last = key.rsplit("/", 1)[-1]
  return last in ("top1",) + GROUPS or "acc" in last


def save_curve_png(history: Sequence[dict], path: str) -> None:
  """Plots accuracy (and loss, where logged) against the round.

  Args:
    history: list of dicts such as {"round": r, "test/top1": a, "train/loss": l}; the x axis is
      "round" (or "step" where rows have no "round"). Accuracy series are keys ending in top1, many,
      medium or few or containing "acc"; loss series are keys containing "loss". A row without a
      key (e.g. evaluation every few rounds) is skipped for that series.
    path: where the PNG goes (written atomically).

  Raises:
    ValueError: on an empty history or one with neither accuracy nor loss keys.
  """
  if not history:
    raise ValueError("history is empty: nothing to plot")
  x_key = "round" if any("round" in row for row in history) else "step"
  keys = sorted({k for row in history for k in row if k not in ("round", "step", "wall_time")})
  acc_keys = [k for k in keys if _is_accuracy_key(k)]
  loss_keys = [k for k in keys if "loss" in k.rsplit("/", 1)[-1] and k not in acc_keys]
  if not acc_keys and not loss_keys:
    raise ValueError(f"history has no accuracy or loss keys to plot (keys: {keys})")

  panels = [(acc_keys, "accuracy (%)"), (loss_keys, "loss")]
  panels = [p for p in panels if p[0]]
  fig = _new_figure(6.0 * len(panels), 4.5)
  for i, (series, ylabel) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for key in series:
      points = [
        (row[x_key], row[key])
        for row in history
        if x_key in row and key in row and row[key] is not None and math.isfinite(float(row[key]))
      ]
      if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(points) <= 50 else None, label=key)
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  _atomic_savefig(fig, path)
