"""One metric writer per run: metrics.jsonl (source of truth), metrics.csv and TensorBoard events.

TensorBoard events are written by `tensorboardX` (a maintained writer; no TensorFlow needed). Every logged step is checked for NaN/inf (big_vision `train.py` does the
same): a non-finite scalar raises `FloatingPointError` naming the metric and the step, before
anything of that step is written.

Resuming: a run killed after its last checkpoint may have logged steps past it. Re-opening the writer
with `resume_step=s` drops the jsonl rows with step > s (atomic rewrite) and opens the TensorBoard
writer with `purge_step=s + 1`, which makes TensorBoard discard the orphaned events.
"""

import csv
import io
import json
import math
import numbers
import os
import time
from typing import Mapping, Optional

from fedllava import errors, fileio

JSONL = "metrics.jsonl"
CSV = "metrics.csv"
TB_DIR = "tb"
_RESERVED = ("step", "wall_time")


_FIX = (
  "restore it from a backup, or move it away and rerun (the run resumes from its checkpoint; "
  "the rows logged before are then not in the new file)"
)


def _read_jsonl(path: str) -> tuple[list[dict], bool]:
  """Reads metrics rows; returns (rows, clean), clean False if a torn last line was skipped.

  Raises:
    errors.DamagedFileError: a line other than the last is not a metrics row (garbage, binary);
      the message names the file, the line and the fix.
  """
  if not os.path.exists(path):
    return [], True
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  # A complete file ends with "\n", so its last split piece is empty; anything else there is a
  # line that a killed process did not finish.
  tail = lines.pop()
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      reason = f"{type(e).__name__}: {e}"
    else:
      if isinstance(row, dict) and isinstance(row.get("step"), int):
        rows.append(row)
        continue
      reason = "not a JSON object with an integer 'step'"
    raise errors.DamagedFileError(f"{path}:{i + 1} is not a metrics row ({reason}); {_FIX}.")
  return rows, not tail.strip()


def read_history(workdir: str) -> list[dict]:
  """Reads a run's metrics.jsonl back.

  Args:
    workdir: the run directory.

  Returns:
    One dict per logged step ({"step", "wall_time", and the scalars}), in the order written; a torn
    last line (killed mid-write) is ignored.
  """
  return _read_jsonl(os.path.join(workdir, JSONL))[0]


def _check_scalars(step: int, scalars: Mapping[str, float]) -> dict[str, float]:
  out = {}
  for name, value in scalars.items():
    if not isinstance(name, str):
      raise TypeError(f"metric names must be str, got {name!r} at step {step}")
    if name in _RESERVED:
      raise ValueError(f"metric name {name!r} is reserved (step {step})")
    try:
      v = float(value)  # numpy / jax scalars and 0-d arrays
    except (TypeError, ValueError) as e:
      raise TypeError(f"metric {name!r} at step {step} is not a scalar: {value!r}") from e
    if not math.isfinite(v):
      raise FloatingPointError(f"metric {name!r} is {v} at step {step}")
    out[name] = v
  return out


class MetricWriter:
  """Appends scalars per step to metrics.jsonl, metrics.csv and TensorBoard (`workdir/tb/`).

  Usage:
    with MetricWriter(workdir, resume_step=start_round - 1) as writer:
      writer.write(round_, {"test/top1": 61.2, "train/loss": 0.93})

  Args:
    workdir: the run directory (created if missing).
    resume_step: None keeps every existing row; an int s drops rows with step > s (pass the
      restored checkpoint's step, or -1 to start afresh and drop all rows).
    tensorboard: also write TensorBoard event files.
    active: False makes every write a no-op except the NaN check (e.g. on hosts other than
      process 0 of a multi-host run).
  """

  def __init__(
    self,
    workdir: str,
    resume_step: Optional[int] = None,
    *,
    tensorboard: bool = True,
    active: bool = True,
  ):
    self.workdir = os.fspath(workdir)
    self.active = active
    self._jsonl_path = os.path.join(self.workdir, JSONL)
    self._csv_path = os.path.join(self.workdir, CSV)
    self._tb = None
    self._jsonl = None
    self._csv_keys: list[str] = []
    if not active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    rows, clean = _read_jsonl(self._jsonl_path)
    kept = rows if resume_step is None else [r for r in rows if r["step"] <= resume_step]
    if len(kept) != len(rows) or not clean:
      fileio.atomic_write_text(self._jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))
    self._rewrite_csv(kept)
    self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter

      purge = None if resume_step is None else int(resume_step) + 1
      # tensorboardX names files by the second; the suffix keeps a resume within the same
      # second from overwriting the previous file (and sorts after it).
      self._tb = SummaryWriter(
        os.path.join(self.workdir, TB_DIR), purge_step=purge, filename_suffix=f".{time.time_ns()}"
      )

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs scalars for one step.

    Args:
      step: the round or training step (a non-negative int).
      scalars: metric name (`split/name`, e.g. "test/top1") to value.

    Raises:
      FloatingPointError: a value is NaN or infinite (nothing of this step is written).
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
      raise ValueError(f"step must be a non-negative int, got {step!r}")
    step = int(step)
    values = _check_scalars(step, scalars)
    if not self.active:
      return
    if self._jsonl is None:
      raise ValueError(f"MetricWriter for {self.workdir} is closed")
    wall_time = time.time()
    row = {"step": step, "wall_time": wall_time, **values}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    self._append_csv(row)
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step, walltime=wall_time)
      self._tb.flush()

  def history(self) -> list[dict]:
    """Returns the rows of metrics.jsonl written so far (see `read_history`)."""
    if self._jsonl is not None:
      self._jsonl.flush()
    return read_history(self.workdir)

  def _rewrite_csv(self, rows: list[dict]) -> None:
    keys = list(_RESERVED) + sorted({k for r in rows for k in r if k not in _RESERVED})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    fileio.atomic_write_text(self._csv_path, buf.getvalue())
    self._csv_keys = keys

  def _append_csv(self, row: dict) -> None:
    # A new metric changes the header: rewrite the file once; otherwise append (O(1) per step).
    if any(k not in self._csv_keys for k in row):
      self._rewrite_csv(self.history())
      return
    with open(self._csv_path, "a", encoding="utf-8", newline="") as f:
      csv.DictWriter(f, fieldnames=self._csv_keys, restval="", lineterminator="\n").writerow(row)

  def close(self) -> None:
    """Flushes and closes the files; further writes raise."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
