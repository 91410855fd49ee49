"""The data set registry (``fedllava/data/registry.py``): a new data set is one spec.

The proof: a toy data set registered here, in the test, and nowhere else, passes ``main.validate``
and builds federated client data, server data and every lookup (normalisation, FL image size,
class names) through the same code paths as the built-in data sets."""

import numpy as np
import pytest
from conftest import tiny_digits

from fedllava.data import classnames, federated, registry, sources

TOY_CLASSES = ("cat", "dog", "bird")


def _load_toy(split, options):
  """A few random 8x8 RGB images, 40 (train) or 4 (test) per class, seeded by the split."""
  per_class = {"train": 40, "test": 4}[split]
  rs = np.random.RandomState([options.seed, per_class])
  n = per_class * len(TOY_CLASSES)
  images = rs.randint(0, 256, (n, 8, 8, 3)).astype(np.uint8)
  labels = rs.permutation(np.arange(n) % len(TOY_CLASSES)).astype(np.int32)
  return sources.Dataset(images, labels, len(TOY_CLASSES), None, "toy")


@pytest.fixture
def toy():
  spec = registry.register(
    registry.DatasetSpec(
      name="toy",
      loader=_load_toy,
      normalization=sources.Normalization((0.5,) * 3, (0.29,) * 3),
      image_size=8,
      num_classes=len(TOY_CLASSES),
      class_names=TOY_CLASSES,
    )
  )
  yield spec
  registry.unregister("toy")
  assert "toy" not in registry.names()


def test_builtin_specs_keep_the_tables_they_replace():
  assert registry.names() == ("cifar10", "cifar100", "imagenet_lt", "digits", "synthetic")
  sizes = {s.name: s.image_size for s in registry.specs()}
  assert sizes == {"cifar10": 32, "cifar100": 32, "digits": 8, "synthetic": 32, "imagenet_lt": 224}
  assert registry.get("cifar100").normalization == registry.get("cifar10").normalization
  assert dict(sources.DATASET_STATS) == {s.name: s.normalization for s in registry.specs()}
  assert [s.name for s in registry.specs() if s.download_host] == ["cifar10", "cifar100"]
  for spec in registry.specs():
    if spec.class_names is not None:
      assert classnames.get_classnames(spec.name) == list(spec.class_names)
  with pytest.raises(ValueError, match="unknown dataset 'mnist'; known: cifar10, cifar100"):
    registry.get("mnist")


def test_register_refuses_a_taken_name_and_a_wrong_class_count(toy):
  with pytest.raises(ValueError, match="already registered"):
    registry.register(toy)
  with pytest.raises(ValueError, match="2 class names for 3 classes"):
    registry.register(registry.DatasetSpec("toy2", _load_toy, toy.normalization, 8, 3, ("a", "b")))
  assert "toy2" not in registry.names()


def test_a_new_data_set_is_one_spec(toy):
  from fedllava import main
  from fedllava.pretrain import train

  c = tiny_digits(
    1,
    **{
      "stages": "federate,align",
      "data.name": "toy",
      "fl.num_clients": 2,
      "fl.clients_per_round": 2,
      "align.per_class": 4,
    },
  )
  main.validate(c)
  data = federated.build(c)
  assert data.norm is toy.normalization and sources.DATASET_STATS["toy"] is toy.normalization
  assert data.num_classes == 3 and data.images.shape[2:] == (8, 8, 3)
  # D_align: 4 per class held out of the 120 training images, the rest long-tailed at IF=10
  assert np.bincount(data.align.labels, minlength=3).tolist() == [4, 4, 4]
  assert data.class_counts.tolist() == [36, 11, 3]
  assert data.sizes.sum() == len(data.train) == 50 and len(data.test) == 12
  assert data.histogram.sum(0).tolist() == data.class_counts.tolist()
  server = federated.build_server_data(c)
  np.testing.assert_array_equal(server.align.images, data.align.images)
  assert server.class_counts.tolist() == [36, 11, 3] and server.norm is toy.normalization
  assert train.fl_image_size(c) == 8
  assert classnames.get_classnames("toy") == list(TOY_CLASSES)
  assert classnames.get_classnames("Toy_LT") == list(TOY_CLASSES)

  c.data.name = "not_registered"
  with pytest.raises(ValueError, match=r"config.data.name='not_registered' is unknown.*'toy'"):
    main.validate(c)
