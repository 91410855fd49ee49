"""A run's human-readable outputs: text tables, figures and ``report.json``.

Figures use matplotlib's Agg canvas (no display, no pyplot global state); every file is written
atomically (temporary file in the target directory, then ``os.replace``), so a killed run never
leaves a half-written PNG or JSON.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import jax
import numpy as np

from fedllava import fileio
from fedllava.evaluate import FEW_MAX, GROUPS, MANY_MIN, row_normalise

_ANNOTATE_MAX = 20  # annotate confusion cells up to this many classes
_TICKS_MAX = 30  # tick labels up to this many classes


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


def _label_confusion_axes(ax, num_classes: int, class_names, fontsize: int) -> None:
  """Axis titles, and class tick labels for up to ``_TICKS_MAX`` classes (none above)."""
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  if num_classes <= _TICKS_MAX:
    ticks = np.arange(num_classes)
    labels = list(class_names) if class_names is not None else [str(t) for t in ticks]
    ax.set_xticks(ticks, labels, rotation=90 if class_names is not None else 0, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
  else:
    ax.set_xticks([])
    ax.set_yticks([])


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
    _label_confusion_axes(ax, num_classes, class_names, fontsize=8)
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


def to_jsonable(report: dict) -> dict:
  """A ``classification_report`` with its arrays as lists (for ``report.json``)."""
  return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in report.items()}


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as indented JSON, atomically."""
  fileio.atomic_write_text(path, json.dumps(obj, indent=1))


def format_comparison(rows: Sequence[tuple[str, dict]]) -> str:
  """The side-by-side table of the pipeline: one row per model, top-1 and many/medium/few.

  Args:
    rows: ``(label, classification_report)`` pairs, e.g. ``("FedAvg", r2), ("+ alignment", r3)``.
  Returns:
    A fixed-width table (no trailing newline); the last column is top-1's change from row 1.
  """
  if not rows:
    raise ValueError("format_comparison needs at least one row")
  width = max(12, max(len(label) for label, _ in rows))
  head = f"  {'model':<{width}}{'top-1':>9}{'many':>9}{'medium':>9}{'few':>9}{'Δ top-1':>10}"
  lines = ["Test accuracy (%), final models side by side", head]
  base = rows[0][1]["top1"]
  for label, r in rows:
    cells = "".join(_fmt(r[k]).rjust(9) for k in ("top1",) + GROUPS)
    lines.append(f"  {label:<{width}}{cells}{r['top1'] - base:>+10.2f}")
  return "\n".join(lines)


def save_confusion_comparison_png(
  panels: Sequence[tuple[str, np.ndarray]], path: str, class_names: Optional[Sequence[str]] = None
) -> None:
  """Row-normalised confusion matrices side by side (the paper's Fig. 4: with and without
  alignment), one panel per ``(title, confusion counts)``."""
  if not panels:
    raise ValueError("save_confusion_comparison_png needs at least one panel")
  num_classes = np.asarray(panels[0][1]).shape[0]
  fig = _new_figure(5.5 * len(panels), 5.0, dpi=max(100, math.ceil(num_classes / 4.5)))
  small = num_classes <= _ANNOTATE_MAX
  for i, (title, confusion) in enumerate(panels):
    matrix = row_normalise(confusion)
    ax = fig.add_subplot(1, len(panels), i + 1)
    im = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(f"{title} (row-normalised)")
    _label_confusion_axes(ax, num_classes, class_names, fontsize=7)
    if small:
      for (r, c), v in np.ndenumerate(matrix):
        color = "white" if v > 0.5 else "black"
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
  fig.colorbar(im, ax=fig.axes, shrink=0.8)
  _atomic_savefig(fig, path)


def save_curves_comparison_png(
  curves: Sequence[tuple[str, Sequence[tuple[int, float]]]], path: str, ylabel: str = "top-1 (%)"
) -> None:
  """Accuracy-vs-round curves of several runs on one axis; a one-point curve is a marker
  (e.g. alignment applied once after the last round)."""
  fig = _new_figure(6.5, 4.5)
  ax = fig.add_subplot(1, 1, 1)
  for label, points in curves:
    if not points:
      continue
    xs, ys = zip(*points)
    if len(points) == 1:
      ax.plot(xs, ys, marker="*", markersize=12, linestyle="none", label=label)
    else:
      ax.plot(xs, ys, marker="." if len(points) <= 50 else None, label=label)
  ax.set_xlabel("round")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  _atomic_savefig(fig, path)


def write_pipeline_report(
  workdir: str, results: dict, stages: Sequence[str], algorithm: str, rounds: int
) -> None:
  """FedAvg alone vs + alignment: table, confusion matrices and curves side by side.

  Rows are named by what made the model: ``fedavg``, ``fedavg + alignment``; when stage 1 ran,
  every row starts from its backbone: ``pretrain + fedavg``, ``pretrain + fedavg + alignment``
  (this pipeline never trains a no-pretraining FedAvg next to them; run the same config without
  'pretrain' in config.stages for that row).

  Args:
    workdir: the run's directory (``report.txt``, ``report.json`` and two PNGs go there).
    results: ``{stage name: StageResult}`` as ``main.run`` collects them (``federate_plain``:
      stage 2 without the per-round alignment).
    stages: ``config.stages`` as a list; algorithm: ``config.fl.algorithm``; rounds:
      ``config.fl.rounds``.
  """
  algo = algorithm
  if "pretrain" in results:
    algo = f"pretrain + {algo}"
  plain = results.get("federate_plain") or results.get("federate")
  if plain is None:
    return
  rows = [(algo, plain.report["final"])]
  curves = [(algo, plain.report.get("curve", []))]
  if "align" in results:
    aligned = results["align"].report
    rows.append((f"{algo} + alignment", aligned["final"]))
    if aligned["when"] == "every_round":
      curves.append((f"{algo} + alignment (every round)", aligned.get("curve", [])))
    else:
      curves.append(
        (f"{algo} + alignment (after round {rounds})", [(rounds, aligned["final"]["top1"])])
      )
  table = format_comparison(rows)
  print(table)
  if jax.process_index() != 0:
    return
  fileio.atomic_write_text(os.path.join(workdir, "report.txt"), table + "\n")
  summary = {
    "stages": list(stages),
    "pretraining": {  # how much stage 1 ran, next to the numbers it fed
      k: results["pretrain"].report.get(k)
      for k in ("steps", "epochs", "images_seen", "fraction_of_paper", "teacher", "demo")
    }
    if "pretrain" in results
    else None,
    "rows": [
      {"model": label, **{k: r[k] for k in ("top1", "many", "medium", "few")}} for label, r in rows
    ],
  }
  write_json(os.path.join(workdir, "report.json"), summary)
  names = plain.report.get("class_names")
  if len(rows) > 1:
    save_confusion_comparison_png(
      [(label, r["confusion"]) for label, r in rows],
      os.path.join(workdir, "confusion_comparison.png"),
      names,
    )
  save_curves_comparison_png(curves, os.path.join(workdir, "accuracy_comparison.png"))
