"""From a config to client data: load, hold out D_align (if stage 3 runs), long-tail, partition.

Seeds (DESIGN.md, "The CReFF protocol"): the long tail uses ``RandomState(longtail_seed)``
(CReFF: numpy's global generator seeded 7 whatever ``--seed`` says; our default is 7 too, and
``data.longtail_seed=None`` follows ``config.seed``); the partition a fresh
``RandomState(config.seed)`` (CReFF ``--seed``); the D_align hold-out
``RandomState(longtail_seed + 1)``, so that with the default fixed long-tail seed a seed sweep
changes the partition, sampling and initialisation but neither D_align nor the training pool.

The server (stage 3) needs the held-out D_align, the test set and the long tail's class
counts, not the clients' data: ``build_server_data`` computes just that.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedllava import errors
from fedllava.data import longtail, partition, registry, sources


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
  """Everything stage 2 needs, as host numpy arrays.

  Attributes:
    train: the long-tailed training pool (clients hold disjoint parts of it).
    test: the balanced test set.
    align: the server's class-balanced D_align (held out before the long tail), or None.
    align_indices: D_align's positions in the full training split (empty when None).
    images: uint8 [K, N_max, H, W, 3], client data padded with copies of its first example.
    labels: int32 [K, N_max].
    sizes: int [K], |D_k|.
    class_counts: int [C], training images per class (defines many/medium/few).
    histogram: int [K, C], each client's class histogram.
    norm: per-channel normalisation.
    unlabeled: the training images that neither the long tail nor D_align kept (no client
      holds them, never the test set), without labels; only when ``build(unlabeled=True)``
      (the server data of FedDF and FedBE), else None.
    labeled: the server's labelled, class-balanced auxiliary set (Ratio Loss's monitor data):
      ``server_labeled_per_class(config)[0]`` images of every class held out of the training
      split before the long tail (no client holds them, never the test set), else None.
  """

  train: sources.Dataset
  test: sources.Dataset
  align: sources.Dataset | None
  align_indices: np.ndarray
  images: np.ndarray
  labels: np.ndarray
  sizes: np.ndarray
  class_counts: np.ndarray
  histogram: np.ndarray
  norm: sources.Normalization
  unlabeled: np.ndarray | None = None
  labeled: sources.Dataset | None = None

  @property
  def num_classes(self) -> int:
    return self.train.num_classes

  def unlabeled_images(self) -> np.ndarray:
    """uint8 ``[N_u, H, W, C]``; raises a ConfigError when there is no such pool."""
    if self.unlabeled is None or not len(self.unlabeled):
      raise errors.ConfigError(
        "this FL method distills on the server's unlabeled images (the training images the "
        "long tail leaves out), and this data set leaves none out (config.data.name, "
        "config.data.imbalance_factor); pick another config.fl.algorithm."
      )
    return self.unlabeled

  def labeled_server_data(self) -> dict:
    """``{"images": uint8 [C * k, H, W, C], "labels": int32 [C * k]}``, the server's labelled
    balanced set; raises a ConfigError when the run holds none out."""
    if self.labeled is None or not len(self.labeled.labels):
      raise errors.ConfigError(
        "this FL method needs the server's labelled balanced images, and the run holds none "
        "out (its module's server_labeled_per_class, e.g. config.fl.ratioloss.aux_per_class, "
        "must be >= 1)."
      )
    return {"images": self.labeled.images, "labels": self.labeled.labels.astype(np.int32)}


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
    download=d.download,
  )


PARTITIONS = ("creff", "dirichlet")


def validate(config) -> None:
  """Checks ``config.data`` (and the client count it is split into) before anything runs.

  Raises:
    ValueError: naming the field and the fix.
  """
  d = config.data
  if d.name not in registry.names():
    raise errors.ConfigError(
      f"config.data.name={d.name!r} is unknown; choose one of {registry.names()}."
    )
  if not (d.imbalance_factor >= 1 and math.isfinite(d.imbalance_factor)):
    raise errors.ConfigError(
      f"config.data.imbalance_factor={d.imbalance_factor} must be a number >= 1 "
      "(IF = n_max / n_min; CReFF's --imb_factor 0.01 is IF=100)."
    )
  if d.partition not in PARTITIONS:
    raise errors.ConfigError(f"config.data.partition={d.partition!r}; choose one of {PARTITIONS}.")
  if not (d.dirichlet_alpha > 0 and math.isfinite(d.dirichlet_alpha)):
    raise errors.ConfigError(
      f"config.data.dirichlet_alpha={d.dirichlet_alpha} must be > 0 "
      "(the paper: 0.5 CIFAR, 0.1 ImageNet-LT)."
    )
  if d.placement not in ("device", "host"):
    raise errors.ConfigError(f"config.data.placement={d.placement!r} must be 'device' or 'host'.")
  if d.crop_padding < 0:
    raise errors.ConfigError(
      f"config.data.crop_padding={d.crop_padding} must be >= 0 (0 turns cropping off)."
    )
  if d.longtail_seed is not None and d.longtail_seed < 0:
    raise errors.ConfigError(f"config.data.longtail_seed={d.longtail_seed} must be >= 0 (or None).")
  spec = registry.get(d.name)
  if spec.check is not None:  # the data set's own fields (synthetic_examples, manual_dir, ...)
    spec.check(d)
  sources.check_available(d.name, d.data_dir, d.download)  # offline: one message, at once


def needs_server_holdout(config) -> bool:
  """Whether the server holds ``align.per_class`` images per class out of the training pool:
  only when a stage that uses them runs (``align`` in ``config.stages``) and no user folder
  (``align.data_dir``) replaces them; otherwise stage 2 trains on the full long tail (CReFF's
  pool)."""
  stages = [s for s in config.get("stages", "").split(",") if s]
  a = config.get("align")
  return "align" in stages and bool(a) and a.per_class > 0 and not a.get("data_dir")


def server_labeled_per_class(config) -> tuple[int, str]:
  """``(images per class, config field)`` of the labelled, class-balanced set the server holds
  out for its FL method, ``(0, "")`` when the method needs none.

  A method asks for one by ``server_data="labeled_balanced"`` and declares the count in its
  module as ``server_labeled_per_class(fl_config) -> (count, "config.fl.<name>.<field>")``
  (Ratio Loss: ``config.fl.ratioloss.aux_per_class``); nothing here names a method.
  """
  fl = config.get("fl")
  if fl is None:
    return 0, ""
  from fedllava import algorithms  # the registry imports the data pipeline's users

  module = algorithms.METHODS.get(fl.get("algorithm"))
  declare = getattr(module, "server_labeled_per_class", None)
  if declare is None:
    return 0, ""
  count, field = declare(fl)
  return int(count), field


def _pools(config, full: sources.Dataset, aux: bool = False):
  """(D_align positions, long-tailed training positions) in the full training split; with
  ``aux`` also the positions of the server's labelled balanced set (``server_labeled_per_class``
  images of every class, held out after D_align and before the long tail)."""
  d = config.data
  c = full.num_classes
  pool = np.arange(len(full))
  held = np.zeros((0,), np.int64)
  per_class = config.align.per_class if needs_server_holdout(config) else 0
  lt_seed = config.seed if d.longtail_seed is None else d.longtail_seed
  if per_class > 0:  # seeded with the long tail's seed: a seed sweep keeps D_align and the pool
    try:
      held, pool = longtail.holdout_balanced(
        full.labels, c, per_class, np.random.RandomState(lt_seed + 1)
      )
    except ValueError as e:
      raise errors.ConfigError(f"config.align.per_class={per_class}: {e}") from None
  labeled = np.zeros((0,), np.int64)
  aux_per_class, aux_field = server_labeled_per_class(config)
  if aux_per_class > 0:  # its own seed: D_align and the long tail's draws stay as they were
    try:
      at, rest = longtail.holdout_balanced(
        full.labels[pool], c, aux_per_class, np.random.RandomState(lt_seed + 2)
      )
    except ValueError as e:
      raise errors.ConfigError(f"{aux_field}={aux_per_class}: {e}") from None
    labeled, pool = pool[at], pool[rest]
  kept = pool[
    longtail.make_longtail(full.labels[pool], c, d.imbalance_factor, np.random.RandomState(lt_seed))
  ]
  return (held, kept, labeled) if aux else (held, kept)


@dataclasses.dataclass(frozen=True, eq=False)
class ServerData:
  """What the server's stage 3 sees: D_align, the test set, and the long tail's class counts."""

  align: sources.Dataset | None
  align_indices: np.ndarray
  test: sources.Dataset
  class_counts: np.ndarray
  norm: sources.Normalization

  @property
  def num_classes(self) -> int:
    return self.test.num_classes


def build_server_data(config) -> ServerData:
  """D_align (the same images ``build`` holds out), the test set and the training class counts."""
  full = _load(config, "train")
  held, kept = _pools(config, full)
  return ServerData(
    align=full.subset(held) if len(held) else None,
    align_indices=held,
    test=_load(config, "test"),
    class_counts=np.bincount(full.labels[kept], minlength=full.num_classes),
    norm=registry.get(config.data.name).normalization,
  )


def build(config, unlabeled: bool = False) -> FederatedData:
  """Builds the federated data set that ``config.data`` and ``config.fl`` describe.

  Args:
    unlabeled: also keep the images the long tail leaves out (``FederatedData.unlabeled``).
  """
  d, fl = config.data, config.fl
  full = _load(config, "train")
  test = _load(config, "test")
  c = full.num_classes
  held, kept, labeled = _pools(config, full, aux=True)
  align = full.subset(held) if len(held) else None
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
    raise errors.ConfigError(
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
    align_indices=held,
    images=images,
    labels=labels,
    sizes=sizes,
    class_counts=np.bincount(train.labels, minlength=c),
    histogram=partition.class_histogram(train.labels, parts, c),
    norm=registry.get(d.name).normalization,
    unlabeled=full.images[np.setdiff1d(np.arange(len(full)), np.concatenate([held, kept, labeled]))]
    if unlabeled
    else None,
    labeled=full.subset(labeled) if len(labeled) else None,
  )
