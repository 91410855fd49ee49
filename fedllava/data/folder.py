"""A user's labelled image folder: ``root/<class folder>/<image>`` (stage 3's D_align).

``align.data_dir`` replaces the held-out D_align with the user's own images, one sub-folder per
class, named readably ("seven", "aquarium fish" or "aquarium_fish") or by the data set's label
string ("n01440764", "7"). Everything is checked before anything runs (``check_folder``): the
class folders, paths that escape the root (e.g. a symlink), and every image decoded. Images are
never unpickled; an unreadable one is an error, since dropping it would change D_align.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from fedllava import errors
from fedllava.data import classnames, federated, registry

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True, eq=False)
class AlignSet:
  """D_align as the server holds it: uint8 images, labels, and where they came from."""

  images: np.ndarray
  labels: np.ndarray
  source: str  # "holdout:<dataset>" or the folder's real path
  ids: tuple  # held-out indices into the training split, or relative file paths


def _folder_images(root: str, index: dict) -> list:
  """``[(relative path, real path, label)]`` of ``root/<class folder>/<image>``, sorted.

  Raises:
    ValueError: an unknown or ambiguous class folder, or an image path escaping ``root``.
  """
  real_root = os.path.realpath(root)
  known = [k for k, v in index.items() if v is not None]  # readable names first
  out = []
  for entry in sorted(os.listdir(real_root)):
    folder = os.path.join(real_root, entry)
    if not os.path.isdir(folder):
      continue
    if index.get(entry) is None:
      what = "names two classes" if entry in index else "is not a class name of this data set"
      raise errors.ConfigError(
        f"config.align.data_dir: folder {entry!r} {what}; rename it to one of "
        f"{known[:10]}{' ...' if len(known) > 10 else ''}."
      )
    for name in sorted(os.listdir(folder)):
      if not name.lower().endswith(_IMAGE_SUFFIXES):
        continue
      path = os.path.realpath(os.path.join(folder, name))
      if os.path.commonpath([path, real_root]) != real_root:
        raise errors.ConfigError(
          f"config.align.data_dir: {entry}/{name} points outside {root}; refused."
        )
      out.append((f"{entry}/{name}", path, index[entry]))
  if not out:
    raise errors.ConfigError(
      f"config.align.data_dir={root!r} holds no images in class sub-folders."
    )
  return out


def _read_image(rel: str, path: str, image_shape=None) -> Optional[np.ndarray]:
  """Decodes one D_align image (resized to ``image_shape`` if given); an unreadable one, a
  decompression bomb included, is a ``ValueError`` naming it: dropping it would change D_align."""
  from PIL import Image  # only for a user folder

  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      if image_shape is None:
        return None
      im = im.resize((image_shape[1], image_shape[0]), Image.BILINEAR)
      return np.asarray(im, np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise errors.ConfigError(
      f"config.align.data_dir: cannot read {rel}: {e}; fix or remove the file."
    ) from None


def check_folder(root: str, index: dict) -> None:
  """Checks a user's D_align before anything runs: class folders, paths, every image decoded."""
  for rel, path, _ in _folder_images(root, index):
    _read_image(rel, path)


def load_folder(root: str, class_names, image_shape, *, index=None) -> AlignSet:
  """A user's D_align: ``root/<class name>/<image>``, resized to the data set's image shape.

  Args:
    class_names: the class names in label order (the folder names), unless ``index``
      (``{folder name: label}``, see ``folder_index``) is given.

  Raises:
    ValueError: an unknown class folder, an image path escaping ``root`` (e.g. a symlink),
      an unreadable image, or no image at all.
  """
  if index is None:
    index = {name: i for i, name in enumerate(class_names)}
  found = _folder_images(root, index)
  images = [_read_image(rel, path, image_shape) for rel, path, _ in found]
  return AlignSet(
    np.stack(images),
    np.asarray([label for *_, label in found], np.int32),
    os.path.realpath(root),
    tuple(rel for rel, *_ in found),
  )


def _label_strings(config) -> tuple:
  """The data set's own label strings (TFDS: the builder's metadata), without its images."""
  d = config.data
  spec = registry.get(d.name)
  if spec.tfds_name:
    import tensorflow_datasets as tfds  # only for a TFDS data set

    builder = tfds.builder(spec.tfds_name, data_dir=d.data_dir or None, file_format="array_record")
    return tuple(builder.info.features["label"].names or ())
  return federated._load(config, "test").class_names or ()  # digits, synthetic: cheap


def folder_index(config) -> dict:
  """``{folder name: label}`` for a user's D_align: the readable names (also with ``_`` for
  spaces, e.g. "aquarium_fish") and the data set's own label strings (e.g. "n01440764", "0").
  A name two classes claim maps to None (refused as ambiguous)."""
  try:
    readable = classnames.get_classnames(config.data.name)
  except ValueError:
    readable = []
  index = {}
  for names in (readable, [n.replace(" ", "_") for n in readable], _label_strings(config)):
    for label, name in enumerate(names):
      index[name] = label if index.get(name, label) == label else None
  return index
