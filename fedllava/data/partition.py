"""Non-IID client partitions: CReFF's balanced Dirichlet split and the plain Dirichlet split.

``creff_partition`` reproduces CReFF's ``clients_indices`` (``build_non_iid_by_dirichlet`` then
``partition_balance``) draw for draw with one ``np.random.RandomState(seed)``:

1. The (position, label) pairs are listed class-major (CReFF's ``indices2targets``) and
   shuffled.
2. The shuffled list is cut into ``ceil(K / 10)`` contiguous chunks, one per group of 10
   workers (the last group takes the remaining ``K - 10 (G - 1)`` workers): every chunk but the
   last holds ``int(10 / K * N)`` pairs, the last the rest.
3. Within a group of W workers holding S pairs, for each class c = 0 .. C-1 (also classes absent
   from the chunk, which still consume a draw): ``p ~ Dirichlet(alpha 1_W)``; the share of every
   worker already holding ``>= S / W`` items is zeroed; p is renormalised and the class's
   positions (in chunk order) are cut at ``int(cumsum(p) * n_c)``. The whole group is redrawn
   until its smallest worker holds ``>= int(0.5 * S / W)`` items.
4. All workers' lists are concatenated in order and cut into K contiguous parts, the first
   ``N mod K`` of size ``N // K + 1``, the rest ``N // K``. So clients have equal sizes (+-1)
   while their label mixtures stay Dirichlet-skewed.

Where CReFF silently drops a group with fewer than 2 items per worker (its redraw loop never
runs), we raise ``ValueError``; CReFF asserts ``K >= 10``, we allow ``K < 10`` as one group of K.

``dirichlet_partition`` is the plain per-class split of Hsu et al. (unequal client sizes).

References:
  Shang, Lu, Huang, Wang, Cheung. Federated Learning on Heterogeneous and Long-Tailed Data via
  Classifier Re-Training with Federated Features (CReFF). IJCAI 2022.
  Hsu, Qi, Brown. Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification. arXiv:1909.06335, 2019.
"""

from __future__ import annotations

import csv
import math

import numpy as np

from fedllava import fileio

GROUP_SIZE = 10  # CReFF's n_auxi_workers: Dirichlet draws are made over groups of 10 workers


def _prepare(labels, num_clients: int, alpha: float, num_classes: int | None):
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D int array, got {labels.dtype} {labels.shape}")
  if labels.size and labels.min() < 0:
    raise ValueError("labels must be >= 0")
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if not alpha > 0:
    raise ValueError(f"alpha (Dirichlet concentration) must be > 0, got {alpha}")
  top = int(labels.max()) + 1 if labels.size else 0
  if num_classes is None:
    num_classes = top
  elif top > num_classes:
    raise ValueError(f"labels reach {top - 1}, outside num_classes={num_classes}")
  return labels, num_classes


def _check_nonempty(parts: list[np.ndarray], alpha: float) -> None:
  for k, part in enumerate(parts):
    if len(part) == 0:
      raise ValueError(
        f"client {k} of {len(parts)} received no data (alpha={alpha}); use fewer clients or "
        "a larger alpha."
      )


def _dirichlet_groups(
  labels,
  num_clients: int,
  alpha: float,
  seed: int,
  *,
  num_classes: int | None = None,
  max_retries: int = 10_000,
) -> list[np.ndarray]:
  """CReFF's ``build_non_iid_by_dirichlet``: the per-worker lists before balancing.

  Args:
    labels: int labels, shape [N].
    num_clients: K workers.
    alpha: Dirichlet concentration.
    seed: seeds the single ``np.random.RandomState`` used for the shuffle and every draw.
    num_classes: C (default ``max(labels) + 1``); every class draws, even an absent one.
    max_retries: redraws per group before giving up (CReFF loops forever).

  Returns:
    K int64 arrays of positions into ``labels``, in worker order; together a permutation of
    ``range(N)``. Worker ``j`` of group ``g`` is entry ``10 g + j``.
  """
  labels, num_classes = _prepare(labels, num_clients, alpha, num_classes)
  n = len(labels)
  rs = np.random.RandomState(seed)
  # CReFF lists (index, label) pairs class by class, each class in its given order.
  pairs = np.argsort(labels, kind="stable").astype(np.int64)
  rs.shuffle(pairs)  # same swaps as RandomState.shuffle of CReFF's list of tuples

  num_groups = math.ceil(num_clients / GROUP_SIZE)
  workers = [GROUP_SIZE] * (num_groups - 1) + [num_clients - GROUP_SIZE * (num_groups - 1)]
  step = int(GROUP_SIZE / num_clients * n)  # CReFF's int(n_auxi_workers / n_workers * N)
  out: list[np.ndarray] = []
  start = 0
  for g, w in enumerate(workers):
    stop = n if g == num_groups - 1 else start + step
    chunk = pairs[start:stop]
    start = stop
    chunk_labels = labels[chunk]
    size = len(chunk)
    need = int(0.50 * size / w)
    if need < 1:
      raise ValueError(
        f"worker group {g} holds {size} items for {w} workers (< 2 per worker); CReFF drops "
        "such a group silently. Use fewer clients or more data."
      )
    class_pos = [chunk[chunk_labels == c] for c in range(num_classes)]
    for _ in range(max_retries):
      lists: list[list[np.ndarray]] = [[] for _ in range(w)]
      sizes = np.zeros(w, np.int64)
      for idx_class in class_pos:
        p = rs.dirichlet(np.repeat(alpha, w))
        p = p * (sizes < size / w)  # no share for workers already at the group's mean size
        total = p.sum()
        if total == 0:  # every worker full: only for an empty class (CReFF's NaN split adds none)
          continue
        p = p / total
        cuts = (np.cumsum(p) * len(idx_class)).astype(int)[:-1]
        for j, piece in enumerate(np.split(idx_class, cuts)):
          lists[j].append(piece)
          sizes[j] += len(piece)
      if sizes.min() >= need:
        break
    else:
      raise ValueError(
        f"worker group {g}: no Dirichlet draw gave every worker >= {need} items in "
        f"{max_retries} tries; use a larger alpha or fewer clients."
      )
    out += [np.concatenate(w) if w else np.zeros((0,), np.int64) for w in lists]
  return out


def _balance(flat: np.ndarray, num_split: int) -> list[np.ndarray]:
  """CReFF's ``partition_balance``: contiguous parts, the first ``len % K`` one item longer."""
  per, rem = divmod(len(flat), num_split)
  bounds = np.cumsum([0] + [per + 1] * rem + [per] * (num_split - rem))
  return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def creff_partition(
  labels,
  num_clients: int,
  alpha: float,
  seed: int,
  *,
  num_classes: int | None = None,
  max_retries: int = 10_000,
) -> list[np.ndarray]:
  """Splits a data set among K clients exactly as CReFF's ``clients_indices`` does.

  Equal-sized clients (+-1) with Dirichlet-skewed label mixtures; see the module docstring for
  the algorithm. To reproduce CReFF on its long-tailed CIFAR, pass
  ``labels = train_labels[kept]`` with ``kept`` from :func:`fedllava.data.longtail.make_longtail`
  in the order it returns, then map ``kept[part]``.

  Args:
    labels: int labels, shape [N].
    num_clients: K.
    alpha: Dirichlet concentration (CReFF ``--non_iid_alpha``, default 0.5).
    seed: seed of the one ``np.random.RandomState`` (CReFF ``--seed``, default 7).
    num_classes: C (default ``max(labels) + 1``); absent classes still consume draws in CReFF.
    max_retries: redraws per group before ``ValueError``.

  Returns:
    K int64 arrays of positions into ``labels`` (CReFF's order within each), disjoint and
    covering ``range(N)``.

  Raises:
    ValueError: a group with < 2 items per worker, an empty client, or bad arguments.
  """
  groups = _dirichlet_groups(
    labels, num_clients, alpha, seed, num_classes=num_classes, max_retries=max_retries
  )
  parts = _balance(np.concatenate(groups), num_clients)
  _check_nonempty(parts, alpha)
  return parts


def dirichlet_partition(
  labels,
  num_clients: int,
  alpha: float,
  seed: int,
  *,
  min_size: int = 1,
  num_classes: int | None = None,
  max_retries: int = 1000,
) -> list[np.ndarray]:
  """Plain per-class Dirichlet split (Hsu et al. 2019); client sizes are unequal.

  For each class c: shuffle its positions, draw ``p ~ Dirichlet(alpha 1_K)`` and give client k
  the slice between ``int(n_c cumsum(p)_{k-1})`` and ``int(n_c cumsum(p)_k)``. The whole split is
  redrawn until every client holds at least ``min_size`` items.

  Args:
    labels: int labels, shape [N].
    num_clients: K.
    alpha: Dirichlet concentration; small alpha gives few classes per client.
    seed: seeds one ``np.random.default_rng``.
    min_size: smallest acceptable client (>= 1).
    num_classes: C (default ``max(labels) + 1``).
    max_retries: redraws before ``ValueError``.

  Returns:
    K sorted int64 arrays of positions into ``labels``, disjoint and covering ``range(N)``.
  """
  labels, num_classes = _prepare(labels, num_clients, alpha, num_classes)
  if min_size < 1:
    raise ValueError(f"min_size must be >= 1 (no empty client), got {min_size}")
  rng = np.random.default_rng(seed)
  class_pos = [np.flatnonzero(labels == c) for c in range(num_classes)]
  for _ in range(max_retries):
    lists: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for pos in class_pos:
      pos = rng.permutation(pos)
      p = rng.dirichlet(np.repeat(alpha, num_clients))
      cuts = (np.cumsum(p) * len(pos)).astype(int)[:-1]
      for k, piece in enumerate(np.split(pos, cuts)):
        lists[k].append(piece)
    parts = [np.sort(np.concatenate(w)).astype(np.int64) for w in lists]
    if min(len(p) for p in parts) >= min_size:
      return parts
  sizes = sorted(len(p) for p in parts)
  _check_nonempty(parts, alpha)
  raise ValueError(
    f"no Dirichlet split gave all {num_clients} clients >= {min_size} items in {max_retries} "
    f"tries (last smallest sizes {sizes[:3]}); use fewer clients, a larger alpha or a smaller "
    "min_size."
  )


def class_histogram(labels, parts, num_classes: int) -> np.ndarray:
  """Counts of each class on each client.

  Args:
    labels: int labels, shape [N].
    parts: K arrays of positions into ``labels``.
    num_classes: C.

  Returns:
    int64 array [K, C]; row k is client k's label histogram.
  """
  labels = np.asarray(labels)
  hist = np.zeros((len(parts), num_classes), np.int64)
  for k, part in enumerate(parts):
    hist[k] = np.bincount(labels[np.asarray(part, np.int64)], minlength=num_classes)
  return hist


def format_histogram(hist, max_classes: int = 20) -> str:
  """A readable per-client table of class counts with per-client and per-class totals.

  Args:
    hist: int array [K, C] from :func:`class_histogram`.
    max_classes: with more classes than this, per-class columns are replaced by a summary
      (classes present, largest class and its count); use :func:`save_histogram` for all.

  Returns:
    The table as one string (no trailing newline).
  """
  hist = np.asarray(hist)
  num_clients, num_classes = hist.shape
  if num_classes <= max_classes:
    header = ["client"] + [f"c{c}" for c in range(num_classes)] + ["total"]
    rows = [[str(k)] + [str(v) for v in row] + [str(row.sum())] for k, row in enumerate(hist)]
    rows.append(["total"] + [str(v) for v in hist.sum(0)] + [str(hist.sum())])
  else:
    header = ["client", "classes", "top_class", "top_count", "total"]
    rows = [
      [
        str(k),
        str(int((row > 0).sum())),
        str(int(row.argmax())),
        str(int(row.max())),
        str(int(row.sum())),
      ]
      for k, row in enumerate(hist)
    ]
    rows.append(["total", str(int((hist.sum(0) > 0).sum())), "", "", str(int(hist.sum()))])
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  fmt = lambda r: "  ".join(s.rjust(wd) for s, wd in zip(r, widths))
  return "\n".join([fmt(header), fmt(["-" * wd for wd in widths])] + [fmt(r) for r in rows])


def save_histogram(hist, path: str) -> str:
  """Writes the histogram as CSV: ``client,class_0,...,class_{C-1},total``, one row per client.

  Args:
    hist: int array [K, C].
    path: output file; parent directories are created.

  Returns:
    ``path``.
  """
  hist = np.asarray(hist)
  with fileio.atomic_open(path, "w") as f:
    writer = csv.writer(f)
    writer.writerow(["client"] + [f"class_{c}" for c in range(hist.shape[1])] + ["total"])
    for k, row in enumerate(hist):
      writer.writerow([k] + [int(v) for v in row] + [int(row.sum())])
  return path
