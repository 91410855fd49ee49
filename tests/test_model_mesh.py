"""``sharding.create_model_mesh``: stage 1's teacher mesh (the ``model`` axis)."""

import jax
from jax.sharding import PartitionSpec as P

from fedllava import sharding


def test_model_mesh_takes_the_first_devices_or_all():
  assert sharding.create_model_mesh().devices.tolist() == jax.devices()
  assert sharding.create_model_mesh(0).devices.tolist() == jax.devices()  # 0: all, as the config
  mesh = sharding.create_model_mesh(2)
  assert mesh.axis_names == (sharding.MODEL,) and mesh.devices.tolist() == jax.devices()[:2]


def test_batches_split_over_the_model_axis_only_when_they_divide():
  mesh = sharding.create_model_mesh(2)
  assert sharding.model_batch_sharding(mesh, 4).spec == P(sharding.MODEL)
  assert sharding.model_batch_sharding(mesh, 3).spec == P()
