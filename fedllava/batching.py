"""Fixed-shape batched application: one compiled shape for any number of examples.

Evaluation (the FL model's predictions) and the teachers (CLIP's image and text towers) run
a jitted function over more examples than fit at once. Every chunk is padded to the same
batch size (by repeating the last example, so padding is always a valid input), the jitted
function compiles once, and the padded rows are dropped from the result.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np


def apply_in_batches(
  fn: Callable, arrays: Sequence[np.ndarray], batch_size: int | None, multiple: int = 1
):
  """``fn(*chunks)`` over fixed-size chunks of ``arrays``, concatenated along axis 0.

  Args:
    fn: takes one chunk of each array (same leading size) and returns an array or a pytree
      of arrays with that leading size.
    arrays: host arrays sharing their leading (example) axis.
    batch_size: examples per call; None (or more than there are) runs one call over all,
      still rounded up to ``multiple``.
    multiple: the batch is rounded up to a multiple of this (e.g. the device count when the
      batch is sharded over a mesh).
  Returns:
    ``fn``'s outputs for every example, in order, as numpy arrays.
  """
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0])
  if n == 0:
    raise ValueError("apply_in_batches needs at least one example")
  if any(len(a) != n for a in arrays):
    raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  b = n if batch_size is None else min(batch_size, n)
  b = -(-b // multiple) * multiple
  outs = []
  for start in range(0, n, b):
    chunk = [a[start : start + b] for a in arrays]
    m = len(chunk[0])
    if m < b:
      chunk = [np.concatenate([c, np.repeat(c[-1:], b - m, 0)]) for c in chunk]
    outs.append(jax.tree.map(lambda y, m=m: np.asarray(y)[:m], fn(*chunk)))
  return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)
