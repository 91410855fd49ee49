"""From a config to client data: load, hold out D_align, long-tail, partition, pad.

Seeds (DESIGN.md, "The CReFF protocol"): the long tail uses ``RandomState(longtail_seed)``
(CReFF: numpy's global generator seeded 7; default here ``config.seed``, which is 7 in the
paper configs); the partition a fresh ``RandomState(config.seed)`` (CReFF ``--seed``); the
D_align hold-out ``RandomState(config.seed + 1)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedllava.data import longtail, partition, sources


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
  """Everything stage 2 needs, as host numpy arrays.

  Attributes:
    train: the long-tailed training pool (clients hold disjoint parts of it).
    test: the balanced test set.
    align: the server's class-balanced D_align (held out before the long tail), or None.
    client_indices: K arrays of positions into ``train``.
    images: uint8 [K, N_max, H, W, 3], client data padded with copies of its first example.
    labels: int32 [K, N_max].
    sizes: int [K], |D_k|.
    class_counts: int [C], training images per class (defines many/medium/few).
    histogram: int [K, C], each client's class histogram.
    norm: per-channel normalisation.
  """

  train: sources.Dataset
  test: sources.Dataset
  align: sources.Dataset | None
  client_indices: list
  images: np.ndarray
  labels: np.ndarray
  sizes: np.ndarray
  class_counts: np.ndarray
  histogram: np.ndarray
  norm: sources.Normalization

  @property
  def num_classes(self) -> int:
    return self.train.num_classes


def _load(config, split: str) -> sources.Dataset:
  d = config.data
  return sources.load_dataset(
    d.name,
    split,
    data_dir=d.data_dir,
    manual_dir=d.manual_dir,
    image_size=d.image_size,
    num_examples=d.synthetic_examples,
    seed=config.seed,
  )


def build(config) -> FederatedData:
  """Builds the federated data set that ``config.data`` and ``config.fl`` describe."""
  d, fl = config.data, config.fl
  full = _load(config, "train")
  test = _load(config, "test")
  c = full.num_classes
  pool = np.arange(len(full))
  align = None
  if d.align_per_class > 0:
    held, pool = longtail.holdout_balanced(
      full.labels, c, d.align_per_class, np.random.RandomState(config.seed + 1)
    )
    align = full.subset(held)
  lt_seed = config.seed if d.longtail_seed is None else d.longtail_seed
  kept = pool[
    longtail.make_longtail(full.labels[pool], c, d.imbalance_factor, np.random.RandomState(lt_seed))
  ]
  train = full.subset(kept)
  if d.partition == "creff":
    parts = partition.creff_partition(
      train.labels, fl.num_clients, d.dirichlet_alpha, config.seed, num_classes=c
    )
  else:
    parts = partition.dirichlet_partition(
      train.labels, fl.num_clients, d.dirichlet_alpha, config.seed, num_classes=c
    )
  sizes = np.asarray([len(p) for p in parts])
  empty = np.nonzero(sizes == 0)[0]
  if len(empty):
    raise ValueError(
      f"clients {empty.tolist()} hold no data; use fewer clients "
      "(config.fl.num_clients) or a larger config.data.dirichlet_alpha."
    )
  n_max = int(sizes.max())
  images = np.empty((len(parts), n_max) + train.images.shape[1:], np.uint8)
  labels = np.empty((len(parts), n_max), np.int32)
  for k, p in enumerate(parts):
    padded = np.concatenate([p, np.full(n_max - len(p), p[0])])
    images[k] = train.images[padded]
    labels[k] = train.labels[padded]
  return FederatedData(
    train=train,
    test=test,
    align=align,
    client_indices=parts,
    images=images,
    labels=labels,
    sizes=sizes,
    class_counts=np.bincount(train.labels, minlength=c),
    histogram=partition.class_histogram(train.labels, parts, c),
    norm=sources.DATASET_STATS[d.name],
  )
