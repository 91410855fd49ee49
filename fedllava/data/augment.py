"""On-device input pipeline of the FL model: normalisation and CIFAR augmentation.

Stage 2 (local training) and stage 3 (alignment) both train the FL model on uint8 images, so
both use these two functions (stages never import each other; they share data code).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def normalize(images_uint8: jax.Array, mean, std, dtype: Any = jnp.float32) -> jax.Array:
  """``(x / 255 - mean) / std`` per channel, computed in ``dtype``.

  Computing in the model's dtype matters for the float64 oracles: a float32 normalisation
  that XLA contracts into an FMA in one program and not in another gives inputs 1 ulp apart,
  enough to flip a ReLU and break a 1e-10 equality of two correct implementations.
  """
  x = images_uint8.astype(dtype)
  return (x / jnp.asarray(255.0, dtype) - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


def augment(
  images: jax.Array, key: jax.Array, padding: int, flip: bool, per_batch: bool
) -> jax.Array:
  """Random crop (zero padding) and horizontal flip, on device.

  The images are already normalised, so the padding is zero in normalised space (the mean
  colour), as in CReFF, which applies its transforms after normalisation.

  Args:
    images: normalised images ``[B, H, W, C]``.
    key: the step's key. Example ``i`` uses ``fold_in(key, i)``, so the first ``m`` examples
      of a padded batch are augmented exactly as an unpadded batch of ``m``.
    padding: pixels of zero padding before the crop (0 disables cropping).
    flip: whether to flip half of the time.
    per_batch: one crop and flip for the whole batch (CReFF applies its torchvision
      transforms to the batch tensor); otherwise each example draws its own.
  Returns:
    Augmented images, same shape.
  """
  b, h, w, _ = images.shape
  if padding == 0 and not flip:
    return images
  if per_batch:
    keys = jnp.broadcast_to(key, (b,) + key.shape)
  else:
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))

  def one(img, k):
    k_crop, k_flip = jax.random.split(k)
    if padding:
      padded = jnp.pad(img, ((padding, padding), (padding, padding), (0, 0)))
      off = jax.random.randint(k_crop, (2,), 0, 2 * padding + 1)
      img = jax.lax.dynamic_slice(padded, (off[0], off[1], 0), img.shape)
    if flip:
      img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
    return img

  return jax.vmap(one)(images, keys)
