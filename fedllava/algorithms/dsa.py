"""Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021), as CReFF's code applies it to
the real images of its client gradients (shangxinyi/CReFF-FL Dataset/param_aug.py, the
``ParamDiffAug`` defaults, ``aug_mode='S'``).

One call of ``augment(images, key, strategy)`` draws *one* strategy uniformly from
``strategy.split('_')`` and *one* set of random parameters for the whole batch (the code's
Siamese mode: a seed is given, so ``theta[:] = theta[0]``); ``color`` applies brightness,
saturation and contrast in that order, each with its own draw. Images are normalised,
``[B, H, W, C]`` (the code's ``[B, C, H, W]`` transposed). Per strategy, with ``u ~ U[0, 1)``:

  color   x + (u1 - 0.5) * 1.0;  then (x - mean_C x) * 2 u2 + mean_C x;
          then (x - mean_HWC x) * (u3 + 0.5) + mean_HWC x   (means per example)
  crop    shift by integers tx, ty in [-s, s], s = int(0.125 H + 0.5), zeros outside
  cutout  zero a square of side int(0.5 H + 0.5) centred (offset - side // 2) at integers
          ox, oy in [0, H + 1 - side % 2), clipped to the image
  flip    mirror the width axis when u < 0.5
  scale   affine_grid(diag(sx, sy)), s = u (1.2 - 1/1.2) + 1/1.2 for x and y separately
  rotate  affine_grid([[cos t, -sin t], [sin t, cos t]]), t = (u - 0.5) * 2 * 15 deg

The affine ops sample the image at ``theta @ (x, y, 1)`` of each output pixel's normalised
centre with bilinear interpolation and zeros outside, as torch's ``F.affine_grid`` +
``F.grid_sample`` with their defaults (``align_corners=False``, ``padding_mode='zeros'``),
which the code uses.

Each op takes its draw explicitly (the ``u`` or the integers above) so it can be checked
against PyTorch; ``draw`` makes the draws of one call from a key. Everything is jittable and
vmappable (the strategy index goes through ``lax.switch``).
"""

import math

import jax
import jax.numpy as jnp

# ParamDiffAug (param_aug.py:6-17) and options.py:33's --dsa_strategy.
STRATEGY = "color_crop_cutout_flip_scale_rotate"
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
NAMES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def parse(strategy: str) -> tuple:
  """The strategy names of ``strategy`` (``'_'``-separated), each checked; ``'none'`` gives ()."""
  if strategy.lower() == "none":
    return ()
  names = tuple(strategy.split("_"))
  bad = [n for n in names if n not in NAMES]
  if not names or bad:
    raise ValueError(f"DSA strategy {strategy!r}: unknown {bad}; use names from {NAMES}")
  return names


def _round(x: float) -> int:
  return int(x + 0.5)  # the code's int(size * ratio + 0.5)


# ---- the ops, each with its draw given ----
def brightness(x, u):
  return x + (u - 0.5) * BRIGHTNESS


def saturation(x, u):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * (u * SATURATION) + mean


def contrast(x, u):
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (u + CONTRAST) + mean


def color(x, u1, u2, u3):
  return contrast(saturation(brightness(x, u1), u2), u3)


def crop_shift(size: int) -> int:
  return _round(size * RATIO_CROP_PAD)


def crop(x, tx, ty):
  """``out[i, j] = x[i + tx, j + ty]``, 0 outside (the code's pad-by-one-and-clamp gather)."""
  _, h, w, _ = x.shape
  rows, cols = jnp.arange(h) + tx, jnp.arange(w) + ty
  valid = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
  out = x[:, jnp.clip(rows, 0, h - 1)][:, :, jnp.clip(cols, 0, w - 1)]
  return out * valid[None, :, :, None].astype(x.dtype)


def cutout_size(size: int) -> int:
  return _round(size * RATIO_CUTOUT)


def cutout(x, ox, oy):
  _, h, w, _ = x.shape
  ch, cw = cutout_size(h), cutout_size(w)

  def span(n, size, offset):
    lo = jnp.clip(offset - size // 2, 0, n - 1)
    hi = jnp.clip(offset - size // 2 + size - 1, 0, n - 1)
    idx = jnp.arange(n)
    return (idx >= lo) & (idx <= hi)

  cut = span(h, ch, ox)[:, None] & span(w, cw, oy)[None, :]
  return x * (1 - cut.astype(x.dtype))[None, :, :, None]


def flip(x, u):
  return jnp.where(u < PROB_FLIP, x[:, :, ::-1], x)


def affine(x, theta):
  """torch ``F.grid_sample(x, F.affine_grid(theta, x.shape))`` (bilinear, zeros, align_corners
  False) for one ``theta [2, 3]`` shared by the batch."""
  _, h, w, _ = x.shape
  dtype = x.dtype
  xn = (2 * jnp.arange(w, dtype=dtype) + 1) / w - 1  # output pixel centres, normalised
  yn = (2 * jnp.arange(h, dtype=dtype) + 1) / h - 1
  gx = theta[0, 0] * xn[None, :] + theta[0, 1] * yn[:, None] + theta[0, 2]  # [H, W]
  gy = theta[1, 0] * xn[None, :] + theta[1, 1] * yn[:, None] + theta[1, 2]
  ix = ((gx + 1) * w - 1) / 2  # unnormalise (align_corners=False)
  iy = ((gy + 1) * h - 1) / 2
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  out = jnp.zeros_like(x)
  for dy in (0, 1):
    for dx in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      wgt = (1 - jnp.abs(ix - xi)) * (1 - jnp.abs(iy - yi))
      valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      xc = jnp.clip(xi, 0, w - 1).astype(jnp.int32)
      yc = jnp.clip(yi, 0, h - 1).astype(jnp.int32)
      out = out + x[:, yc, xc] * jnp.where(valid, wgt, 0)[None, :, :, None]
  return out


def scale(x, ux, uy):
  lo = 1.0 / RATIO_SCALE
  sx, sy = ux * (RATIO_SCALE - lo) + lo, uy * (RATIO_SCALE - lo) + lo
  z = jnp.zeros_like(sx)
  return affine(x, jnp.stack([jnp.stack([sx, z, z]), jnp.stack([z, sy, z])]))


def rotate(x, u):
  t = (u - 0.5) * 2 * RATIO_ROTATE / 180 * math.pi
  c, s, z = jnp.cos(t), jnp.sin(t), jnp.zeros_like(t)
  return affine(x, jnp.stack([jnp.stack([c, -s, z]), jnp.stack([s, c, z])]))


# ---- one call ----
def draw(key, shape, dtype):
  """One call's draws (scalars, shared by the batch) for every strategy: ``u`` uniforms in
  ``[0, 1)`` and the integers of crop and cutout, for images of ``shape [B, H, W, C]``."""
  _, h, w, _ = shape
  ks = jax.random.split(key, 11)
  u = lambda k: jax.random.uniform(k, (), dtype)  # noqa: E731
  sh, sw = crop_shift(h), crop_shift(w)
  ch, cw = cutout_size(h), cutout_size(w)
  return {
    "color": (u(ks[0]), u(ks[1]), u(ks[2])),
    "crop": (
      jax.random.randint(ks[3], (), -sh, sh + 1),
      jax.random.randint(ks[4], (), -sw, sw + 1),
    ),
    "cutout": (
      jax.random.randint(ks[5], (), 0, h + (1 - ch % 2)),
      jax.random.randint(ks[6], (), 0, w + (1 - cw % 2)),
    ),
    "flip": (u(ks[7]),),
    "scale": (u(ks[8]), u(ks[9])),
    "rotate": (u(ks[10]),),
  }


OPS = {
  "color": color,
  "crop": crop,
  "cutout": cutout,
  "flip": flip,
  "scale": scale,
  "rotate": rotate,
}


def choose(key, names: tuple):
  """The index into ``names`` of one call's strategy (uniform)."""
  return jax.random.randint(jax.random.fold_in(key, 0), (), 0, len(names))


def augment(x, key, strategy: str = STRATEGY):
  """DSA of a batch ``x [B, H, W, C]`` (normalised): one strategy and one draw for the whole
  batch, from ``key``."""
  names = parse(strategy)
  if not names:
    return x
  params = draw(jax.random.fold_in(key, 1), x.shape, x.dtype)
  branches = [lambda x, p=params, n=n: OPS[n](x, *p[n]) for n in names]
  if len(branches) == 1:
    return branches[0](x)
  return jax.lax.switch(choose(key, names), branches, x)
