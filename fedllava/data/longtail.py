"""Exponential long-tail sampling (Cui et al. 2019) as CReFF's code does it.

CReFF (Shang et al. 2022) builds CIFAR-10/100-LT from the balanced training set:
class ``c`` keeps

    n_c = int(n_max * (1 / IF) ** (c / (C - 1))),   n_max = N / C (a float),

images, chosen by shuffling that class's whole index list (ascending dataset order) with
numpy's *global* generator seeded 7 (``np.random.seed(7)``; ``np.random.shuffle`` on a Python
list, once per class, classes in order) and keeping the first ``n_c``. A class with fewer than
``n_c`` images keeps them all. Passing ``np.random.RandomState(7)`` to :func:`make_longtail`
reproduces CReFF's indices exactly (a legacy ``RandomState.shuffle`` of an int array draws the
same swaps as ``np.random.shuffle`` of a list of the same length).

References:
  Cui, Jia, Lin, Song, Belongie. Class-Balanced Loss Based on Effective Number of Samples.
  CVPR 2019.
  Shang, Lu, Huang, Wang, Cheung. Federated Learning on Heterogeneous and Long-Tailed Data via
  Classifier Re-Training with Federated Features (CReFF). IJCAI 2022.
"""

from __future__ import annotations

import numpy as np

Rng = np.random.Generator | np.random.RandomState


def _check_imbalance_factor(imbalance_factor: float) -> None:
  if not imbalance_factor >= 1:  # also rejects NaN
    raise ValueError(
      f"imbalance_factor must be >= 1 (IF = n_max / n_min), got {imbalance_factor}. "
      "CReFF's --imb_factor is the inverse ratio (0.01 means IF=100, 0.02 means IF=50): "
      f"pass 1 / {imbalance_factor} instead."
    )


def _check_labels(labels, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
    )
  return labels


def longtail_counts(n_max: float, num_classes: int, imbalance_factor: float) -> list[int]:
  """Per-class image counts of an exponential long tail.

  ``n_c = int(n_max * (1 / IF) ** (c / (C - 1)))`` for ``c = 0 .. C-1``, with CReFF's exact
  float arithmetic (so class 0 keeps ``int(n_max)`` and the last ``int(n_max / IF)``).

  Args:
    n_max: images of the head class (CReFF: ``len(train_set) / C`` as a float).
    num_classes: C.
    imbalance_factor: IF = n_0 / n_{C-1} >= 1; 1 gives a balanced set.

  Returns:
    A list of C non-increasing ints.

  References:
    Cui et al. 2019 (exponential profile); Shang et al. 2022 (CReFF ``_get_img_num_per_cls``).
  """
  _check_imbalance_factor(imbalance_factor)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if num_classes == 1:
    return [int(n_max)]
  ratio = 1.0 / imbalance_factor  # CReFF's imb_factor (e.g. 0.01): 1/100 == 0.01 exactly
  return [int(n_max * ratio ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def make_longtail(labels, num_classes: int, imbalance_factor: float, rng: Rng) -> np.ndarray:
  """Samples an exponentially long-tailed subset, exactly as CReFF's ``train_long_tail``.

  ``n_max = len(labels) / num_classes`` (a float, as in CReFF even when the set is not
  balanced). For each class in order, the class's positions (ascending) are shuffled in place
  by ``rng.shuffle`` and the first ``n_c`` kept.

  Args:
    labels: int labels of the pool, shape [N].
    num_classes: C.
    imbalance_factor: IF >= 1.
    rng: ``np.random.RandomState(7)`` reproduces CReFF (its global generator after
      ``np.random.seed(7)``); a ``np.random.Generator`` also works (different draws).

  Returns:
    int64 positions into ``labels``, class-major (all of class 0, then class 1, ...) and, within
    a class, in shuffled order. Keep this order when feeding the subset to
    :func:`fedllava.data.partition.creff_partition`: CReFF's partition depends on it.
  """
  labels = _check_labels(labels, num_classes)
  counts = longtail_counts(len(labels) / num_classes, num_classes, imbalance_factor)
  kept = []
  for c, n_c in enumerate(counts):
    idx = np.flatnonzero(labels == c).astype(np.int64)
    rng.shuffle(idx)  # same swap sequence as CReFF's np.random.shuffle(list)
    kept.append(idx[:n_c])
  return np.concatenate(kept) if kept else np.zeros((0,), np.int64)


def holdout_balanced(
  labels, num_classes: int, per_class: int, rng: Rng
) -> tuple[np.ndarray, np.ndarray]:
  """Holds out ``per_class`` random images of every class (the server's D_align).

  Taken from the balanced pool *before* long-tail sampling, so the held-out set is class
  balanced and never reaches a client. With ``per_class=0`` nothing is held out (and the
  long tail drawn from the remainder is CReFF's exactly).

  Args:
    labels: int labels of the pool, shape [N].
    num_classes: C.
    per_class: images held out per class (k >= 0).
    rng: numpy Generator or RandomState; each class's positions are shuffled by it in class
      order and the first k held out.

  Returns:
    ``(held_out, remaining)``: sorted int64 positions into ``labels``; disjoint, covering all.
  """
  labels = _check_labels(labels, num_classes)
  if per_class < 0:
    raise ValueError(f"per_class must be >= 0, got {per_class}")
  held = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c).astype(np.int64)
    if len(idx) < per_class:
      raise ValueError(
        f"class {c} has only {len(idx)} images, fewer than per_class={per_class} to hold "
        "out; lower the number of held-out images per class."
      )
    rng.shuffle(idx)
    held.append(idx[:per_class])
  held_out = np.sort(np.concatenate(held)) if held else np.zeros((0,), np.int64)
  mask = np.ones(len(labels), bool)
  mask[held_out] = False
  return held_out, np.flatnonzero(mask).astype(np.int64)
