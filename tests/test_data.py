"""Oracle tests for data sources, CReFF's long tail and CReFF's client partition."""

import functools
import math
import os
import sys

import numpy as np
import pytest

from fedllava.data import federated, longtail, partition, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits_lt  # noqa: E402  pylint: disable=g-import-not-at-top

# CIFAR-10-LT, IF=100, n_max=5000 (CReFF / Cui et al. 2019); given by the spec.
CIFAR10_LT100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _lt_labels(seed=None):
  """12406 labels with the CIFAR-10-LT IF=100 counts, optionally shuffled."""
  labels = np.repeat(np.arange(10), CIFAR10_LT100).astype(np.int32)
  return labels if seed is None else np.random.default_rng(seed).permutation(labels)


# ----------------------------------------------------------------------------- long tail


def test_longtail_counts_cifar10_if100():
  counts = longtail.longtail_counts(5000.0, 10, 100)
  assert counts == CIFAR10_LT100
  assert sum(counts) == 12406


@pytest.mark.parametrize("num_classes", [2, 10, 100])
@pytest.mark.parametrize("imbalance_factor", [1, 10, 50, 100, 256.5])
def test_longtail_counts_profile(num_classes, imbalance_factor):
  counts = longtail.longtail_counts(500.0, num_classes, imbalance_factor)
  assert len(counts) == num_classes and counts[0] == 500
  assert all(a >= b for a, b in zip(counts, counts[1:]))
  assert counts[-1] == int(500.0 / imbalance_factor + 1e-9)
  if imbalance_factor == 1:
    assert counts == [500] * num_classes


def test_longtail_rejects_inverse_factor():
  with pytest.raises(ValueError, match="1 / 0.01"):
    longtail.longtail_counts(5000.0, 10, 0.01)
  with pytest.raises(ValueError, match=">= 1"):
    longtail.make_longtail(np.zeros(10, int), 10, 0.5, np.random.RandomState(0))


def test_make_longtail_counts_unique_reproducible():
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 5000))
  kept = longtail.make_longtail(labels, 10, 100, np.random.RandomState(7))
  assert np.bincount(labels[kept], minlength=10).tolist() == CIFAR10_LT100
  assert len(np.unique(kept)) == len(kept) == 12406
  # class-major order, as CReFF concatenates its per-class lists
  assert np.all(np.diff(labels[kept]) >= 0)
  again = longtail.make_longtail(labels, 10, 100, np.random.RandomState(7))
  other = longtail.make_longtail(labels, 10, 100, np.random.RandomState(8))
  np.testing.assert_array_equal(kept, again)
  assert not np.array_equal(kept, other)
  gen = longtail.make_longtail(labels, 10, 100, np.random.default_rng(7))
  assert np.bincount(labels[gen], minlength=10).tolist() == CIFAR10_LT100


def test_make_longtail_draws_like_creff_global_shuffle():
  """CReFF: np.random.seed(7); per class, np.random.shuffle(list_of_indices); keep a prefix."""
  labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 300))
  state = np.random.get_state()
  try:
    np.random.seed(7)
    expected = []
    for c, n_c in enumerate(longtail.longtail_counts(300.0, 10, 50)):
      idx = [int(i) for i in np.flatnonzero(labels == c)]
      np.random.shuffle(idx)
      expected += idx[:n_c]
  finally:
    np.random.set_state(state)
  kept = longtail.make_longtail(labels, 10, 50, np.random.RandomState(7))
  assert kept.tolist() == expected


def test_make_longtail_short_class_keeps_all():
  labels = np.array([0] * 10 + [1] * 2 + [2] * 10)  # n_max = 22/3; class 1 wants 2.3 -> 2
  kept = longtail.make_longtail(labels, 3, 1, np.random.RandomState(0))
  assert np.bincount(labels[kept]).tolist() == [7, 2, 7]


def test_holdout_balanced_before_longtail():
  labels = np.random.default_rng(2).permutation(np.repeat(np.arange(10), 100))
  held, rest = longtail.holdout_balanced(labels, 10, 5, np.random.RandomState(0))
  assert np.bincount(labels[held]).tolist() == [5] * 10
  assert len(np.intersect1d(held, rest)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([held, rest])), np.arange(1000))
  kept = rest[longtail.make_longtail(labels[rest], 10, 10, np.random.RandomState(7))]
  assert len(np.intersect1d(kept, held)) == 0
  assert np.bincount(labels[kept]).tolist() == longtail.longtail_counts(95.0, 10, 10)
  with pytest.raises(ValueError, match="class"):
    longtail.holdout_balanced(labels, 10, 101, np.random.RandomState(0))


# ----------------------------------------------------------------------------- partition


def _assert_cover(parts, n):
  flat = np.concatenate(parts)
  assert len(flat) == n
  np.testing.assert_array_equal(np.sort(flat), np.arange(n))


@pytest.mark.parametrize("num_clients", [10, 20, 25, 30])
def test_creff_partition_cover_and_balance(num_clients):
  labels = _lt_labels(seed=3)
  parts = partition.creff_partition(labels, num_clients, 0.5, seed=7)
  assert len(parts) == num_clients
  _assert_cover(parts, len(labels))
  sizes = [len(p) for p in parts]
  per, rem = divmod(len(labels), num_clients)
  assert sizes == [per + 1] * rem + [per] * (num_clients - rem)  # partition_balance's cut


def test_creff_partition_seed():
  labels = _lt_labels()
  a = partition.creff_partition(labels, 20, 0.5, seed=7)
  b = partition.creff_partition(labels, 20, 0.5, seed=7)
  c = partition.creff_partition(labels, 20, 0.5, seed=8)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("num_clients", [10, 20, 25, 30])
def test_dirichlet_groups_cover_their_chunk(num_clients):
  """Each group's workers hold exactly its contiguous chunk of the seed's first shuffle."""
  labels, seed, alpha = _lt_labels(seed=4), 5, 0.5
  n = len(labels)
  groups = partition._dirichlet_groups(labels, num_clients, alpha, seed)
  assert len(groups) == num_clients
  # Oracle: the first draw of RandomState(seed) shuffles the class-major list of positions.
  pairs = np.argsort(labels, kind="stable")
  np.random.RandomState(seed).shuffle(pairs)
  num_groups = math.ceil(num_clients / 10)
  step = int(10 / num_clients * n)
  for g in range(num_groups):
    workers = groups[10 * g : 10 * (g + 1)]
    chunk = pairs[g * step : (n if g == num_groups - 1 else (g + 1) * step)]
    np.testing.assert_array_equal(np.sort(np.concatenate(workers)), np.sort(chunk))
    assert min(len(w) for w in workers) >= int(0.5 * len(chunk) / len(workers))
    for w in workers:  # within a worker, classes come in order (one Dirichlet cut per class)
      assert np.all(np.diff(labels[w]) >= 0)
  # creff_partition = concatenate the workers, then cut into equal contiguous parts.
  parts = partition.creff_partition(labels, num_clients, alpha, seed)
  np.testing.assert_array_equal(np.concatenate(parts), np.concatenate(groups))


# An independent transcription of CReFF-FL's data pipeline (shangxinyi/CReFF-FL:
# Dataset/dataset.py classify_label, Dataset/long_tailed_cifar10.py train_long_tail,
# Dataset/sample_dirichlet.py clients_indices / build_non_iid_by_dirichlet /
# partition_balance), written as plain Python lists the way that code runs.


def _creff_classify_label(labels, num_classes):
  out = [[] for _ in range(num_classes)]
  for idx, y in enumerate(labels.tolist()):
    out[y].append(idx)
  return out


def _creff_train_long_tail(list_label2indices, num_classes, imb_factor):
  """imb_factor is CReFF's (0.01 for IF=100); numpy's global generator, as CReFF seeds it."""
  img_max = sum(len(x) for x in list_label2indices) / num_classes
  img_num = [int(img_max * (imb_factor ** (c / (num_classes - 1.0)))) for c in range(num_classes)]
  out = []
  for c, n in zip(range(num_classes), img_num):
    indices = list(list_label2indices[c])
    np.random.shuffle(indices)
    out.append(indices[:n])
  return out


def _creff_partition_balance(idxs, num_split):
  num_per_part, r = len(idxs) // num_split, len(idxs) % num_split
  parts, i, r_used = [], 0, 0
  while i < len(idxs):
    if r_used < r:
      parts.append(idxs[i : i + num_per_part + 1])
      i += num_per_part + 1
      r_used += 1
    else:
      parts.append(idxs[i : i + num_per_part])
      i += num_per_part
  return parts


def _creff_dirichlet(seed, indices2targets, alpha, num_classes, num_indices, n_workers):
  random_state = np.random.RandomState(seed)
  n_auxi = 10
  random_state.shuffle(indices2targets)
  num_splits = math.ceil(n_workers / n_auxi)
  from_index, splitted = 0, []
  for idx in range(num_splits):
    to_index = from_index + int(n_auxi / n_workers * num_indices)
    splitted.append(
      indices2targets[from_index : (num_indices if idx == num_splits - 1 else to_index)]
    )
    from_index = to_index
  idx_batch = []
  for targets in splitted:
    targets = np.array(targets)
    size = len(targets)
    w = min(n_auxi, n_workers)
    n_workers = n_workers - n_auxi
    min_size, batch = 0, None
    while min_size < int(0.50 * size / w):
      batch = [[] for _ in range(w)]
      for c in range(num_classes):
        idx_class = targets[np.where(targets[:, 1] == c)[0], 0]
        p = random_state.dirichlet(np.repeat(alpha, w))
        p = np.array([pj * (len(bj) < size / w) for pj, bj in zip(p, batch)])
        with np.errstate(all="ignore"):  # CReFF's 0/0 for an empty class: NaN cuts, no items
          p = p / p.sum()
          cuts = (np.cumsum(p) * len(idx_class)).astype(int)[:-1]
        batch = [bj + piece.tolist() for bj, piece in zip(batch, np.split(idx_class, cuts))]
        min_size = min(len(bj) for bj in batch)
    if batch is not None:
      idx_batch += batch
  return idx_batch


def _creff_clients(labels, num_classes, imb_factor, num_clients, alpha, seed):
  """CReFF main.py: np.random.seed(7); classify_label; train_long_tail; clients_indices."""
  state = np.random.get_state()
  try:
    np.random.seed(7)
    lt = _creff_train_long_tail(_creff_classify_label(labels, num_classes), num_classes, imb_factor)
  finally:
    np.random.set_state(state)
  indices2targets = [(idx, label) for label, indices in enumerate(lt) for idx in indices]
  batches = _creff_dirichlet(
    seed, indices2targets, alpha, num_classes, len(indices2targets), num_clients
  )
  flat = functools.reduce(lambda x, y: x + y, batches)
  return _creff_partition_balance(flat, num_clients)


@pytest.mark.parametrize(
  "num_classes, per_class, imbalance_factor, num_clients, alpha, seed",
  [
    (10, 5000, 100, 20, 0.5, 7),  # CIFAR-10-LT as the paper runs it
    (10, 5000, 50, 20, 0.1, 7),
    (10, 5000, 10, 20, 0.5, 3),
    (10, 5000, 10, 20, 0.1, 0),  # a redraw ends on min == int(0.5 S / W) exactly
    (10, 5000, 100, 25, 0.1, 1),  # a short last group of 5 workers
    (10, 300, 100, 20, 0.5, 0),  # a worker at exactly S / W gets no further share
    (100, 500, 100, 20, 0.5, 7),  # CIFAR-100-LT
    (100, 500, 50, 20, 0.1, 7),
    (100, 500, 10, 20, 0.1, 2),
  ],
)
def test_clients_match_creff_transcription_index_for_index(
  num_classes, per_class, imbalance_factor, num_clients, alpha, seed
):
  """make_longtail(RandomState(7)) + creff_partition = CReFF's client index lists, exactly."""
  # CIFAR-sized balanced labels in a shuffled "dataset order".
  labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))
  want = _creff_clients(labels, num_classes, 1 / imbalance_factor, num_clients, alpha, seed)
  kept = longtail.make_longtail(labels, num_classes, imbalance_factor, np.random.RandomState(7))
  parts = partition.creff_partition(labels[kept], num_clients, alpha, seed, num_classes=num_classes)
  assert len(parts) == len(want) == num_clients
  for k, (ours, theirs) in enumerate(zip(parts, want)):
    assert kept[ours].tolist() == [int(i) for i in theirs], f"client {k}"


def _digits_config(seed, per_class=0, **data):
  c = digits_lt.get_config("tiny")
  c.seed = seed
  c.align.per_class = per_class  # 0: CReFF has no D_align
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.mark.parametrize("per_class", [0, 10])
def test_longtail_seed_fixes_the_pool_across_config_seeds(per_class):
  """Default longtail_seed=7 (CReFF's np.random.seed(7)): seeds change partitions, not the pool
  (nor D_align, which is held out with the long tail's seed)."""
  a, b = _digits_config(7, per_class), _digits_config(8, per_class)
  assert a.data.longtail_seed == 7 == b.data.longtail_seed
  full = sources.load_dataset("digits", "train")
  np.testing.assert_array_equal(federated._pools(a, full)[1], federated._pools(b, full)[1])
  da, db = federated.build(a), federated.build(b)
  np.testing.assert_array_equal(da.train.labels, db.train.labels)
  np.testing.assert_array_equal(da.train.images, db.train.images)
  assert not np.array_equal(da.histogram, db.histogram)  # the partition follows config.seed
  assert not np.array_equal(da.labels, db.labels)
  np.testing.assert_array_equal(da.align_indices, db.align_indices)


def test_longtail_seed_none_follows_config_seed():
  full = sources.load_dataset("digits", "train")
  pool = lambda c: federated._pools(c, full)[1]  # noqa: E731
  follow8 = pool(_digits_config(8, longtail_seed=None))
  np.testing.assert_array_equal(follow8, pool(_digits_config(8, longtail_seed=8)))
  assert not np.array_equal(follow8, pool(_digits_config(8)))  # the default 7
  assert not np.array_equal(follow8, pool(_digits_config(7, longtail_seed=None)))
  np.testing.assert_array_equal(
    federated.build(_digits_config(8, longtail_seed=None)).train.labels,
    full.labels[follow8],
  )


def test_creff_partition_is_non_iid():
  labels = _lt_labels()
  parts = partition.creff_partition(labels, 20, 0.1, seed=7)
  hist = partition.class_histogram(labels, parts, 10)
  share = hist / hist.sum(1, keepdims=True)
  global_share = np.bincount(labels) / len(labels)
  tv = 0.5 * np.abs(share - global_share).sum(1)
  assert tv.max() > 0.3  # alpha=0.1 gives strongly skewed clients


def test_creff_partition_small_group_raises():
  labels = np.arange(30) % 3
  with pytest.raises(ValueError, match="fewer clients"):
    partition.creff_partition(labels, 20, 0.5, seed=0)


def test_creff_partition_counts_absent_classes():
  labels = _lt_labels()
  a = partition.creff_partition(labels, 20, 0.5, seed=7)
  b = partition.creff_partition(labels, 20, 0.5, seed=7, num_classes=12)
  assert not all(np.array_equal(x, y) for x, y in zip(a, b))  # extra classes consume draws


def test_dirichlet_partition():
  labels = _lt_labels(seed=5)
  parts = partition.dirichlet_partition(labels, 20, 0.5, seed=1, min_size=10)
  _assert_cover(parts, len(labels))
  assert min(len(p) for p in parts) >= 10
  again = partition.dirichlet_partition(labels, 20, 0.5, seed=1, min_size=10)
  assert all(np.array_equal(x, y) for x, y in zip(parts, again))
  hist = partition.class_histogram(labels, parts, 10)
  np.testing.assert_array_equal(hist.sum(0), np.bincount(labels, minlength=10))
  assert hist.sum(1).tolist() == [len(p) for p in parts]


def test_dirichlet_partition_empty_client_raises():
  with pytest.raises(ValueError, match="client .* fewer clients or a larger alpha"):
    partition.dirichlet_partition(np.arange(6) % 2, 12, 0.1, seed=0, max_retries=3)


def test_histogram_table_and_csv(tmp_path):
  labels = _lt_labels()
  parts = partition.creff_partition(labels, 10, 0.5, seed=7)
  hist = partition.class_histogram(labels, parts, 10)
  np.testing.assert_array_equal(hist.sum(0), CIFAR10_LT100)
  table = partition.format_histogram(hist)
  lines = table.splitlines()
  assert len(lines) == 2 + 10 + 1
  assert lines[-1].split()[0] == "total" and lines[-1].split()[-1] == "12406"
  assert lines[2].split()[-1] == str(len(parts[0]))
  assert "top_class" in partition.format_histogram(hist, max_classes=5)
  path = partition.save_histogram(hist, str(tmp_path / "sub" / "hist.csv"))
  back = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64)
  np.testing.assert_array_equal(back[:, 1:-1], hist)
  np.testing.assert_array_equal(back[:, -1], hist.sum(1))


# ----------------------------------------------------------------------------- sources


def test_digits_split():
  train = sources.load_dataset("digits", "train")
  test = sources.load_dataset("digits", "test")
  for ds in (train, test):
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (8, 8, 3)
    assert ds.labels.dtype == np.int32 and ds.num_classes == 10
    assert ds.images.max() == 255 and set(np.unique(ds.labels)) == set(range(10))
    np.testing.assert_array_equal(ds.images[..., 0], ds.images[..., 2])
  assert len(train) + len(test) == 1797
  # stratified 80/20: every class's test share is round(0.2 n_c)
  counts = np.bincount(train.labels) + np.bincount(test.labels)
  np.testing.assert_array_equal(np.bincount(test.labels), np.round(0.2 * counts))
  # disjoint and deterministic
  _, _, tr, te = sources._digits_split()
  assert len(np.intersect1d(tr, te)) == 0
  np.testing.assert_array_equal(sources.load_dataset("digits", "test").images, test.images)
  # documented statistics match the train split
  x = train.images.astype(np.float64) / 255
  np.testing.assert_allclose(sources.DATASET_STATS["digits"].mean, [x.mean()] * 3, atol=1e-4)
  np.testing.assert_allclose(sources.DATASET_STATS["digits"].std, [x.std()] * 3, atol=1e-4)


def test_synthetic():
  ds = sources.load_dataset(
    "synthetic", "train", num_examples=50, image_shape=(16, 16, 1), num_classes=5, seed=3
  )
  assert ds.images.shape == (50, 16, 16, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and np.bincount(ds.labels).tolist() == [10] * 5
  same = sources.load_dataset(
    "synthetic", "train", num_examples=50, image_shape=(16, 16, 1), num_classes=5, seed=3
  )
  test = sources.load_dataset(
    "synthetic", "test", num_examples=50, image_shape=(16, 16, 1), num_classes=5, seed=3
  )
  np.testing.assert_array_equal(ds.images, same.images)
  assert not np.array_equal(ds.images, test.images)
  sub = ds.subset([3, 1])
  np.testing.assert_array_equal(sub.labels, ds.labels[[3, 1]])


def test_unknown_dataset():
  with pytest.raises(ValueError, match="cifar10, cifar100, imagenet_lt, digits, synthetic"):
    sources.load_dataset("mnist", "train")


def test_resize_center_crop():
  img = np.zeros((47, 17, 3), np.uint8)
  img[:, :, 0] = 200
  out = sources.resize_center_crop(img, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  assert np.all(out[..., 0] == 200) and np.all(out[..., 1] == 0)
  assert sources.resize_center_crop(np.zeros((5, 9), np.uint8), 4).shape == (4, 4, 3)


try:
  import tensorflow_datasets as tfds
except ImportError:  # the TFDS paths are optional; everything else runs without them
  tfds = None
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow_datasets is not installed")


@needs_tfds
@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_tfds_mock(name, num_classes):
  with tfds.testing.mock_data(num_examples=20):
    ds = sources.load_dataset(name, "train")
    small = sources.load_dataset(name, "test", image_size=16)
  assert ds.images.shape == (20, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (20,) and ds.labels.dtype == np.int32
  assert ds.labels.min() >= 0 and ds.labels.max() < num_classes
  assert ds.num_classes == num_classes and ds.name == name
  assert len(ds.class_names) == num_classes
  assert small.images.shape == (20, 16, 16, 3)


@needs_tfds
def test_imagenet_lt_manual_missing(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  with pytest.raises(FileNotFoundError) as err:
    sources.load_dataset(
      "imagenet_lt", "train", data_dir=str(tmp_path / "data"), manual_dir=str(manual), image_size=32
    )
  msg = str(err.value)
  assert str(manual) in msg
  assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
  with pytest.raises(ValueError, match="image_size"):
    sources.load_dataset("imagenet_lt", "train", data_dir=str(tmp_path / "data"))


@needs_tfds
def test_imagenet_lt_through_tfds_mock(tmp_path):
  for f in sources.IMAGENET_LT_MANUAL_FILES:
    (tmp_path / f).write_bytes(b"")
  with tfds.testing.mock_data(num_examples=6):
    ds = sources.load_dataset("imagenet_lt", "train", manual_dir=str(tmp_path), image_size=24)
  assert ds.images.shape == (6, 24, 24, 3) and ds.images.dtype == np.uint8
  assert ds.num_classes == 1000 and ds.labels.max() < 1000


def _lt_size(labels, imbalance_factor=10.0, num_classes=10):
  """CReFF's long-tail size by counting: n_c = int(n_max (1/IF)^(c/(C-1))), n_max = N/C."""
  counts = np.bincount(labels, minlength=num_classes)
  n_max = len(labels) / num_classes
  return sum(
    min(int(counts[c]), int(n_max * (1 / imbalance_factor) ** (c / (num_classes - 1))))
    for c in range(num_classes)
  )


def test_d_align_is_held_out_only_when_stage_3_runs():
  """stages=federate trains on the long tail of the FULL train split (CReFF's pool); only with
  'align' in config.stages are align.per_class images per class held out of it first."""
  from conftest import tiny_digits

  full = sources.load_dataset("digits", "train")
  lt = lambda labels: longtail.make_longtail(labels, 10, 10.0, np.random.RandomState(7))  # noqa: E731
  only2 = tiny_digits(stages="federate")
  assert only2.align.per_class == 10 and not federated.needs_server_holdout(only2)
  data = federated.build(only2)
  assert data.align is None and len(data.align_indices) == 0
  assert len(data.train) == _lt_size(full.labels)
  np.testing.assert_array_equal(data.train.images, full.images[lt(full.labels)])
  assert federated.build_server_data(only2).align is None

  both = tiny_digits(stages="federate,align")
  assert federated.needs_server_holdout(both)
  data = federated.build(both)
  held = data.align_indices
  assert np.bincount(full.labels[held], minlength=10).tolist() == [10] * 10
  rest = np.setdiff1d(np.arange(len(full)), held)
  assert len(data.train) == _lt_size(full.labels[rest])
  np.testing.assert_array_equal(data.train.images, full.images[rest[lt(full.labels[rest])]])
  np.testing.assert_array_equal(data.align.images, full.images[held])


@needs_tfds
def test_cifar_missing_offline_is_one_message_at_once(tmp_path, monkeypatch):
  import time

  from fedllava import errors

  empty = str(tmp_path / "empty")
  monkeypatch.setattr(sources, "reachable", lambda host, timeout=3.0: False)  # no network
  for download, why in ((False, "config.data.download=False"), (True, "cannot reach")):
    start = time.monotonic()
    with pytest.raises(errors.MissingInputError) as e:
      sources.check_available("cifar10", empty, download)
    assert time.monotonic() - start < 5  # no download retries
    message = str(e.value)
    assert f"cifar10 is not prepared in {empty} and {why}" in message
    assert f"tfds build cifar10 --data_dir={empty}" in message
    assert "config.data.data_dir" in message and "TFDS_DATA_DIR" in message
  monkeypatch.setenv("TFDS_DATA_DIR", empty)
  with pytest.raises(errors.MissingInputError, match=f"not prepared in {empty} "):
    sources.check_available("cifar100", None, False)


@needs_tfds
def test_a_prepared_cifar_passes_the_check_and_loads_offline(tmp_path):
  from conftest import prepared_tfds

  data_dir = prepared_tfds(tmp_path, "cifar10")
  sources.check_available("cifar10", data_dir, download=False)
  with tfds.testing.mock_data(num_examples=4):
    assert len(sources.load_dataset("cifar10", "test", data_dir=data_dir, download=False)) == 4
