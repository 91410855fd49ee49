"""The data set registry: one :class:`DatasetSpec` per data set, everything the stages ask of it.

A data set is known by name (``config.data.name``). Its spec says how to load a split, how to
normalise its pixels, the FL model's input side, its readable class names (CLIP's prompts), its
TFDS name and download host, and its own config checks. Every stage reads these through
``get(name)``; nothing else lists data sets. Adding one is one ``register(DatasetSpec(...))``
(plus a config file in ``configs/``)::

  registry.register(registry.DatasetSpec(
    name="toy", loader=load_toy, normalization=sources.Normalization((0.5,) * 3, (0.25,) * 3),
    image_size=8, num_classes=3, class_names=("cat", "dog", "bird")))

The built-in data sets (``cifar10``, ``cifar100``, ``imagenet_lt``, ``digits``, ``synthetic``) are
registered at the end of this module, in that order (the order error messages list them in).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from fedllava.data import classnames, sources


@dataclasses.dataclass(frozen=True)
class LoadOptions:
  """What ``sources.load_dataset`` passes a loader; each loader reads the fields it needs.

  Attributes:
    data_dir: TFDS data directory (None: TFDS's default).
    manual_dir: where manually downloaded archives are (``imagenet_lt``).
    image_size: resize + centre-crop side, or None.
    num_examples, image_shape, num_classes, seed: ``synthetic``'s size, shape, classes and seed.
    download: whether a TFDS copy missing from ``data_dir`` may be downloaded.
  """

  data_dir: Optional[str] = None
  manual_dir: Optional[str] = None
  image_size: Optional[int] = None
  num_examples: int = 1000
  image_shape: Sequence[int] = (32, 32, 3)
  num_classes: int = 10
  seed: int = 0
  download: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSpec:
  """Everything fedllava needs to know about one data set.

  Attributes:
    name: the ``config.data.name`` that selects it.
    loader: ``loader(split, options: LoadOptions) -> sources.Dataset``, the whole split in memory.
    normalization: per-channel mean and std of pixels in [0, 1] (the FL model's input).
    image_size: the FL model's input side when ``data.image_size`` and
      ``pretrain.fl_image_size`` leave it open (stage 1 resizes its images to it).
    num_classes: C.
    class_names: C readable names in label order (CLIP's prompts), or None.
    aliases: other names ``classnames.get_classnames`` accepts for the class names (case,
      ``-``/``_`` and an ``_lt`` suffix are ignored anyway).
    tfds_name: the TFDS builder it is read through, or None.
    download_host: the host TFDS downloads it from (probed before a run starts; see
      ``sources.check_available``), or None when it is shipped or prepared by hand.
    check: ``check(config.data)``: the data set's own config checks (raise
      ``errors.ConfigError``), or None.
  """

  name: str
  loader: Callable[[str, LoadOptions], Any]
  normalization: sources.Normalization
  image_size: int
  num_classes: int
  class_names: Optional[tuple[str, ...]] = None
  aliases: tuple[str, ...] = ()
  tfds_name: Optional[str] = None
  download_host: Optional[str] = None
  check: Optional[Callable[[Any], None]] = None


_SPECS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
  """Adds ``spec`` under ``spec.name``; returns it.

  Raises:
    ValueError: the name is taken (unless ``replace``), or ``class_names`` does not hold
      ``num_classes`` names.
  """
  if spec.name in _SPECS and not replace:
    raise ValueError(f"data set {spec.name!r} is already registered")
  if spec.class_names is not None and len(spec.class_names) != spec.num_classes:
    raise ValueError(
      f"data set {spec.name!r}: {len(spec.class_names)} class names for {spec.num_classes} classes"
    )
  _SPECS[spec.name] = spec
  return spec


def unregister(name: str) -> None:
  """Removes a registered data set (tests register throw-away ones)."""
  _SPECS.pop(name, None)


def get(name: str) -> DatasetSpec:
  """The spec registered as ``name``.

  Raises:
    ValueError: unknown name, listing the known ones.
  """
  if name not in _SPECS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(_SPECS)}")
  return _SPECS[name]


def find(name: str) -> Optional[DatasetSpec]:
  """The spec registered as ``name``, or None."""
  return _SPECS.get(name)


def names() -> tuple[str, ...]:
  """The registered names, in registration order."""
  return tuple(_SPECS)


def specs() -> tuple[DatasetSpec, ...]:
  """The registered specs, in registration order."""
  return tuple(_SPECS.values())


# ---- the built-in data sets (sources.py has their loaders and checks) ----
# CReFF normalises CIFAR-100 with the CIFAR-10 statistics too.
register(
  DatasetSpec(
    "cifar10",
    sources.tfds_loader("cifar10"),
    sources.CIFAR_STATS,
    32,
    10,
    classnames.CIFAR10_CLASSES,
    tfds_name="cifar10",
    download_host="www.cs.toronto.edu",
  )
)
register(
  DatasetSpec(
    "cifar100",
    sources.tfds_loader("cifar100"),
    sources.CIFAR_STATS,
    32,
    100,
    classnames.CIFAR100_CLASSES,
    tfds_name="cifar100",
    download_host="www.cs.toronto.edu",
  )
)
register(
  DatasetSpec(
    "imagenet_lt",
    sources.tfds_loader("imagenet_lt", manual=True),
    sources.IMAGENET_STATS,
    224,
    1000,
    classnames.IMAGENET_CLASSES,
    aliases=("imagenet1k", "imagenet2012"),
    tfds_name="imagenet_lt",
    check=sources.check_imagenet_lt_config,
  )
)
register(
  DatasetSpec(
    "digits",
    sources.load_digits,
    sources.DIGITS_STATS,
    8,
    10,
    classnames.DIGITS_CLASSES,
  )
)
register(
  DatasetSpec(
    "synthetic",
    sources.load_synthetic,
    sources.SYNTHETIC_STATS,
    32,
    10,  # LoadOptions.num_classes' default; federated.build does not change it
    check=sources.check_synthetic_config,
  )
)
