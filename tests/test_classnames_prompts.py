"""Stage 3's CLIP prompts name the classes readably for every data set (digits, CIFAR-10/100,
ImageNet-LT), whatever the data set's own label strings are; a user's D_align folder may use
either. The expected names are written here, not read from fedllava/data/classnames.py."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from fedllava import align, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits_lt  # noqa: E402  pylint: disable=g-import-not-at-top

try:
  import tensorflow_datasets as tfds
except ImportError:
  tfds = None
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow_datasets is not installed")

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _RecordingTeacher:
  """A stand-in CLIP that records the class names and templates it is asked to embed."""

  seen = []

  def __init__(self, name):
    pass

  def class_embeddings(self, names, templates):
    type(self).seen.append((list(names), list(templates)))
    return np.eye(len(names), dtype=np.float32)

  def zero_shot_logits(self, images, emb, batch_size=None):
    return np.zeros((len(images), emb.shape[0]), np.float32)


def _config(name, **fields):
  c = digits_lt.get_config("tiny")
  c.data.name = name
  # a local directory passes the up-front teacher check; _RecordingTeacher stands in for CLIP
  c.align.teacher, c.align.beta, c.align.templates = ROOT, 1.0, "default"
  for k, v in fields.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


def _folder(root, classes):
  for name in classes:
    os.makedirs(root / name)
    Image.fromarray(np.full((12, 12, 3), 100, np.uint8)).save(root / name / "a.png")
  return str(root)


def _prompted(config, workdir):
  _RecordingTeacher.seen = []
  ctx = align._prepare(config, str(workdir), _RecordingTeacher)
  ((names, templates),) = _RecordingTeacher.seen
  return names, [templates[0].format(n) for n in names], ctx


def test_digits_prompts_name_the_digits(tmp_path):
  names, prompts, ctx = _prompted(_config("digits"), tmp_path)
  assert names == DIGITS and prompts[7] == "a photo of a seven."
  assert ctx.names == DIGITS  # the report's confusion matrix too
  # A user folder may name a class readably or by the data set's label string.
  cfg = _config("digits", **{"align.data_dir": _folder(tmp_path / "d", ["seven", "3"])})
  cfg.align.per_class = 0
  main.validate(cfg)
  names, _, ctx = _prompted(cfg, tmp_path / "w")
  assert names == DIGITS
  assert dict(zip(ctx.dset.ids, ctx.dset.labels.tolist())) == {"3/a.png": 3, "seven/a.png": 7}


@needs_tfds
@pytest.mark.parametrize(
  "name, folders, labels, first, count, prompt",
  [
    ("cifar10", ["cat", "truck"], [3, 9], CIFAR10, 10, "a photo of a truck."),
    (
      "cifar100",
      ["aquarium_fish", "maple tree"],
      [1, 47],
      ["apple", "aquarium fish"],
      100,
      "a photo of a maple tree.",
    ),
    (
      "imagenet_lt",
      ["n01440764", "goldfish"],
      [0, 1],
      ["tench", "goldfish"],
      1000,
      "a photo of a goldfish.",
    ),
  ],
)
def test_tfds_prompts_are_readable(tmp_path, name, folders, labels, first, count, prompt):
  """TFDS's label strings are synset ids (ImageNet-LT), "aquarium_fish" (CIFAR-100, or "0".."99"
  where the metadata is not downloaded): the prompts use readable names all the same."""
  manual = tmp_path / "manual"
  manual.mkdir()
  for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    (manual / f).write_bytes(b"")
  cfg = _config(name, **{"align.data_dir": _folder(tmp_path / "d", folders), "align.per_class": 0})
  cfg.data.manual_dir = str(manual)
  cfg.data.image_size = 8 if name == "imagenet_lt" else None
  with tfds.testing.mock_data(num_examples=20):
    names, prompts, ctx = _prompted(cfg, tmp_path / "w")
  assert len(names) == count and names[: len(first)] == first and ctx.names == names
  assert prompts[labels[1]] == prompt
  assert not any(n.startswith("n0") and n[1:].isdigit() for n in names)  # no synset ids
  assert not any("_" in n for n in names)
  assert sorted(ctx.dset.labels.tolist()) == labels


def test_no_readable_names_with_beta_is_a_config_error(tmp_path):
  cfg = _config("synthetic")
  with pytest.raises(
    ValueError, match=r"config.align.beta=1 needs readable class names.*synthetic"
  ):
    main.validate(cfg)
  cfg.align.beta = 0.0  # no prompts: the report labels classes by number
  main.validate(cfg)
  assert align.class_names(cfg, 10) == [str(c) for c in range(10)]


def test_unknown_class_folder_is_refused_up_front(tmp_path):
  cfg = _config("digits", **{"align.data_dir": _folder(tmp_path / "d", ["seven", "cat"])})
  with pytest.raises(ValueError, match="'cat' is not a class name"):
    main.validate(cfg)
