"""The FL model's predictions on uint8 images, batch split over the mesh (stages 2 and 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedllava import batching, sharding
from fedllava.data import augment


def create_predict_fn(model, mean, std, mesh):
  """Jitted ``(variables, uint8 images) -> predicted classes``, batch split over the mesh.

  Images are normalised in the parameters' dtype (``augment.normalize``), BN in eval mode.
  """

  def predict(variables, images):
    dtype = jnp.result_type(*jax.tree.leaves(variables["params"]))
    x = augment.normalize(images, mean, std, dtype)
    return jnp.argmax(model.apply(variables, x, train=False)["logits"], axis=-1)

  return jax.jit(
    predict,
    in_shardings=(sharding.replicated(mesh), sharding.client_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def predict_all(predict_fn, variables, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """Predictions for every image, in fixed-size padded batches (one compilation).

  Every process passes the same images; each batch becomes one global array split over the
  mesh (``make_array_from_callback``), so this runs unchanged on one host or several.
  """
  cs = sharding.client_sharding(mesh)

  def fn(x):
    return predict_fn(variables, jax.make_array_from_callback(x.shape, cs, lambda i: x[i]))

  return batching.apply_in_batches(fn, (images,), batch_size, multiple=mesh.size)
