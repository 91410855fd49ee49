"""Image classification data sets as in-memory uint8 arrays.

Every loader returns a :class:`Dataset`: ``images`` uint8 [N, H, W, 3] (grey images repeated
to 3 channels) and ``labels`` int32 [N]. Sources:

* ``cifar10``, ``cifar100``: TFDS through ``tfds.data_source`` (ArrayRecord, no TensorFlow
  needed to read a prepared copy); every record is read into numpy.
* ``imagenet_lt``: TFDS ``imagenet_lt`` (Liu et al. 2019's ImageNet-LT: train / validation /
  test). It needs the ImageNet-2012 tars downloaded by hand into ``manual_dir``; images vary in
  size, so ``image_size`` is required: shorter side resized (bilinear, antialiased) to
  ``image_size`` then a centre crop, as torchvision's ``Resize`` + ``CenterCrop``.
* ``digits``: scikit-learn's ``load_digits`` (1797 8x8 grey images, values 0..16, 10 classes)
  shipped with the package, so it works offline. Pixels become ``round(v * 255 / 16)``. The
  train/test split is fixed and stratified: each class's positions are permuted by one
  ``np.random.RandomState(0)`` (classes in order) and the first ``round(0.2 * n_c)`` go to
  ``test`` (359 images), the rest to ``train`` (1438); each split is in ascending order.
* ``synthetic``: uniform random uint8 images with balanced labels from a seed (benchmarks).

Each data set is one spec in ``registry.py`` (loader, normalisation, sizes, class names, checks);
``load_dataset`` dispatches through it, and ``DATASET_STATS`` is a read-only view of the specs'
per-channel normalisations (mean, std) in [0, 1] units.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from fedllava import errors


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory labelled image set.

  Attributes:
    images: uint8 [N, H, W, 3].
    labels: int32 [N].
    num_classes: C.
    class_names: C readable names, or None.
    name: the source name (``cifar10``, ``digits``, ...).
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...] | None = None
  name: str = ""

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices) -> "Dataset":
    """The examples at ``indices`` (in that order), same metadata."""
    indices = np.asarray(indices, np.int64)
    return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


class Normalization(NamedTuple):
  """Per-channel mean and std of pixel values scaled to [0, 1]."""

  mean: tuple[float, float, float]
  std: tuple[float, float, float]


CIFAR_STATS = Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # CReFF's values
IMAGENET_STATS = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# digits: mean and std of all pixels of the train split above (grey, so equal channels); the
# tests recompute them.
DIGITS_STATS = Normalization((0.3058,) * 3, (0.3764,) * 3)
# synthetic: a discrete uniform on 0..255 has mean 127.5 and std sqrt((256^2 - 1) / 12).
SYNTHETIC_STATS = Normalization((0.5,) * 3, (float(np.sqrt((256**2 - 1) / 12) / 255),) * 3)


class _StatsView(Mapping):
  """``{name: Normalization}`` of every registered data set, read from the registry."""

  def _specs(self):
    from fedllava.data import registry  # registry imports this module

    return {s.name: s.normalization for s in registry.specs()}

  def __getitem__(self, name: str) -> Normalization:
    return self._specs()[name]

  def __iter__(self):
    return iter(self._specs())

  def __len__(self) -> int:
    return len(self._specs())


# Derived: each data set's normalization is its registry spec's (``registry.DatasetSpec``).
DATASET_STATS: Mapping[str, Normalization] = _StatsView()

IMAGENET_LT_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def to_rgb(images: np.ndarray) -> np.ndarray:
  """[N, H, W] or [N, H, W, 1] grey images → [N, H, W, 3]; RGB passes through."""
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.shape[-1] != 3:
    raise ValueError(f"expected 1 or 3 channels, got shape {images.shape}")
  return images


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to ``size`` (bilinear, antialiased) and centre-crops a square.

  Args:
    image: uint8 [H, W, C] (C = 1 or 3) or [H, W].
    size: output side.

  Returns:
    uint8 [size, size, 3].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = to_rgb(np.asarray(image, np.uint8)[None])[0]
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  pil = Image.fromarray(image).resize((nw, nh), Image.BILINEAR)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The fixed stratified digits split: (images, labels, train positions, test positions)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target.astype(np.int32)
  rs = np.random.RandomState(DIGITS_SPLIT_SEED)
  test = []
  for c in range(10):
    pos = rs.permutation(np.flatnonzero(labels == c))
    test.append(pos[: int(round(DIGITS_TEST_FRACTION * len(pos)))])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return images, labels, train, test


def load_digits(split: str, options=None) -> Dataset:
  """``digits``' loader (``registry.DatasetSpec.loader``): the fixed stratified split."""
  del options  # nothing to choose
  images, labels, train, test = _digits_split()
  if split not in ("train", "test"):
    raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
  pos = train if split == "train" else test
  return Dataset(to_rgb(images[pos]), labels[pos], 10, tuple(str(c) for c in range(10)), "digits")


def load_synthetic(split: str, options) -> Dataset:
  """``synthetic``'s loader: ``options.num_examples`` uniform random images of
  ``options.image_shape``, balanced over ``options.num_classes``, from ``options.seed`` and the
  split."""
  num_examples, image_shape = options.num_examples, options.image_shape
  num_classes, seed = options.num_classes, options.seed
  split_id = {"train": 0, "test": 1, "validation": 2}.get(split)
  if split_id is None:
    raise ValueError(f"synthetic has splits train/test/validation, got {split!r}")
  shape = tuple(image_shape)
  if len(shape) != 3 or shape[-1] not in (1, 3):
    raise ValueError(f"image_shape must be (H, W, 1 or 3), got {image_shape}")
  rng = np.random.default_rng([seed, split_id])
  images = rng.integers(0, 256, (num_examples,) + shape, dtype=np.uint8)
  labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
  return Dataset(to_rgb(images), labels, num_classes, None, "synthetic")


def _read_source(source, chunk: int = 1024) -> list[dict]:
  """Reads every record of a TFDS data source (batched reads where the source allows)."""
  n = len(source)
  records: list[dict] = []
  batched = hasattr(source, "__getitems__")
  for start in range(0, n, chunk):
    keys = list(range(start, min(n, start + chunk)))
    if batched:
      try:
        records.extend(source.__getitems__(keys))
        continue
      except TypeError:  # tfds.testing.mock_data's source has a broken __getitems__
        batched = False
    records.extend(source[i] for i in keys)
  return records


def _check_imagenet_manual(manual_dir: str | None) -> str:
  manual_dir = os.path.expanduser(manual_dir or "~/tensorflow_datasets/downloads/manual")
  missing = [f for f in IMAGENET_LT_MANUAL_FILES if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise errors.MissingInputError(
      f"imagenet_lt is not prepared and needs a manual download: put {' and '.join(missing)} "
      f"(ImageNet-2012 train/val archives, from https://image-net.org/download-images after "
      f"registering) into {manual_dir} (or pass manual_dir=...). TFDS expects exactly: "
      f"{', '.join(IMAGENET_LT_MANUAL_FILES)}. Preparing also needs TensorFlow and network "
      "access to fetch the ImageNet-LT subset lists; once prepared, reading needs neither."
    )
  return manual_dir


def check_imagenet_lt_config(d) -> None:
  """``imagenet_lt``'s own checks of ``config.data`` (``registry.DatasetSpec.check``)."""
  manual = d.manual_dir or os.path.expanduser("~/tensorflow_datasets/downloads/manual")
  if not os.path.isdir(manual):
    raise errors.ConfigError(
      f"ImageNet-LT needs the ImageNet-2012 tars in a manual directory, and "
      f"{manual!r} does not exist: download ILSVRC2012_img_train.tar and "
      "ILSVRC2012_img_val.tar there, or set --config.data.manual_dir."
    )
  if not d.image_size:
    raise errors.ConfigError(
      "ImageNet-LT images vary in size: set config.data.image_size (e.g. 224)."
    )


def check_synthetic_config(d) -> None:
  """``synthetic``'s own check of ``config.data``."""
  if d.synthetic_examples < 1:
    raise errors.ConfigError("config.data.synthetic_examples must be >= 1.")


def tfds_data_dir(data_dir: str | None) -> str:
  """The TFDS data directory searched: ``data_dir``, else ``$TFDS_DATA_DIR``, else TFDS's default."""
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def reachable(host: str, timeout: float = 3.0) -> bool:
  """Whether ``host`` resolves and accepts a connection on port 443 within ``timeout`` seconds
  (the DNS look-up runs in a thread, since ``getaddrinfo`` has no timeout of its own)."""
  import socket
  import threading

  found = []

  def probe():
    try:
      with socket.create_connection((host, 443), timeout=timeout):
        found.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout + 1)
  return bool(found)


def check_available(name: str, data_dir: str | None, download: bool) -> None:
  """Stops at once, before anything is written or downloaded, when a TFDS data set can be had
  neither from ``data_dir`` (see ``tfds_data_dir``) nor, with ``download``, from the network.

  Raises:
    errors.MissingInputError: naming the directory searched, the command that prepares it on
      a machine with network, and the field and variable that point the run at it.
  """
  from fedllava.data import registry  # registry imports this module

  spec = registry.find(name)
  # digits, synthetic: shipped; imagenet_lt: the manual check; others: their spec's download host
  if spec is None or spec.download_host is None:
    return
  import tensorflow_datasets as tfds

  where = tfds_data_dir(data_dir)
  if tfds.builder(name, data_dir=where, file_format="array_record").is_prepared():
    return
  host = spec.download_host
  if download and reachable(host):
    return
  why = f"cannot reach {host} to download it" if download else "config.data.download=False"
  raise errors.MissingInputError(
    f"{name} is not prepared in {where} and {why}. On a machine with network run "
    f"`tfds build {name} --data_dir={where}` (or `--file_format=array_record`) and copy that "
    "folder here; then point config.data.data_dir (or the TFDS_DATA_DIR variable) at it."
  )


def tfds_loader(name: str, manual: bool = False):
  """A loader (``registry.DatasetSpec.loader``) reading the TFDS data set ``name``.

  Args:
    name: the TFDS builder's name.
    manual: the data set is prepared from ImageNet-2012 archives downloaded by hand (checked
      in ``manual_dir`` before TFDS is asked); its images vary in size, so ``image_size`` is
      required.
  """

  def load(split: str, options) -> Dataset:
    return _load_tfds(
      name,
      split,
      options.data_dir,
      options.manual_dir,
      options.image_size,
      options.download,
      manual,
    )

  return load


def _load_tfds(
  name: str,
  split: str,
  data_dir: str | None,
  manual_dir: str | None,
  image_size: int | None,
  download: bool = True,
  manual: bool = False,
) -> Dataset:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"{name} is read through tensorflow_datasets: pip install "
      "tensorflow-datasets (TensorFlow itself is not needed)."
    ) from e

  # Random access needs ArrayRecord files; TFDS only picks that format itself when data_dir is
  # None, so ask for it explicitly (a copy prepared as TFRecord cannot be read this way).
  builder_kwargs = {"file_format": "array_record"}
  kwargs = {"download": download}
  if manual:
    if image_size is None:
      raise ValueError("imagenet_lt images vary in size: pass image_size (e.g. 32, 64 or 224)")
    if not tfds.builder(name, data_dir=data_dir, **builder_kwargs).is_prepared():
      manual_dir = _check_imagenet_manual(manual_dir)
      kwargs["download_and_prepare_kwargs"] = {
        "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
      }
  source = tfds.data_source(
    name, split=split, data_dir=data_dir, builder_kwargs=builder_kwargs, **kwargs
  )
  records = _read_source(source)
  if image_size is not None:
    images = (
      np.stack([resize_center_crop(r["image"], image_size) for r in records])
      if records
      else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
  else:
    images = to_rgb(np.stack([np.asarray(r["image"], np.uint8) for r in records]))
  labels = np.asarray([int(r["label"]) for r in records], np.int32)
  label_feature = source.dataset_info.features["label"]
  names = tuple(label_feature.names) if label_feature.names else None
  return Dataset(images, labels, int(label_feature.num_classes), names, name)


def load_dataset(
  name: str,
  split: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  image_size: int | None = None,
  num_examples: int = 1000,
  image_shape: Sequence[int] = (32, 32, 3),
  num_classes: int = 10,
  seed: int = 0,
  download: bool = True,
) -> Dataset:
  """Loads a whole split into memory.

  Args:
    name: a registered data set (``registry.names()``).
    split: ``train`` / ``test`` (TFDS also ``validation`` and slices such as ``train[:10%]``).
    data_dir: TFDS data directory (default TFDS's, ``~/tensorflow_datasets``).
    manual_dir: where the ImageNet tars are for ``imagenet_lt`` (default
      ``~/tensorflow_datasets/downloads/manual``).
    image_size: resize + centre-crop side; required for ``imagenet_lt``, optional for the rest
      of TFDS, ignored for ``digits`` and ``synthetic``.
    num_examples, image_shape, num_classes, seed: ``synthetic`` only (the split also seeds).
    download: CIFAR only: whether a copy missing from ``data_dir`` may be downloaded (see
      ``check_available``).

  Returns:
    A :class:`Dataset`.

  Raises:
    ValueError: unknown name or split. FileNotFoundError: ImageNet-LT manual files missing;
    ``errors.MissingInputError``: CIFAR neither prepared nor downloadable.
  """
  from fedllava.data import registry  # registry imports this module

  options = registry.LoadOptions(
    data_dir=data_dir,
    manual_dir=manual_dir,
    image_size=image_size,
    num_examples=num_examples,
    image_shape=image_shape,
    num_classes=num_classes,
    seed=seed,
    download=download,
  )
  return registry.get(name).loader(split, options)
