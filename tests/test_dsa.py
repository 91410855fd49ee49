"""DSA (``fedllava/algorithms/dsa.py``) against PyTorch computations written here from the
formulas of CReFF's code (Dataset/param_aug.py, ``ParamDiffAug`` defaults): each op with its
draw passed explicitly to both sides, on non-square normalised images (``[B, C, H, W]`` in
torch, ``[B, H, W, C]`` here); the affine ops through torch's ``F.affine_grid`` +
``F.grid_sample`` (align_corners False, zeros). Then one call: one strategy, uniform, and one
draw for the whole batch (Siamese).

Mutations watched being caught: rotation by the wrong sign (``[[c, s], [-s, c]]``) fails
``test_affine_ops_are_torch_affine_grid_and_grid_sample``; ``align_corners=True``
unnormalisation fails the same test; per-example instead of per-batch draws (``augment``
vmapped over examples with ``fold_in(key, i)``) fails ``test_one_draw_for_the_whole_batch``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedllava.algorithms import dsa

B, H, W = 3, 10, 16


def _images(seed=0):
  return np.random.default_rng(seed).normal(size=(B, H, W, 3))


def _t(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _back(t):
  return np.transpose(t.numpy(), (0, 2, 3, 1))


def _close(got, want_torch):
  np.testing.assert_allclose(np.asarray(got), _back(want_torch), rtol=0, atol=1e-12)


@pytest.mark.parametrize("u", [0.0, 0.3, 0.999])
def test_color_ops_are_the_code_formulas(x64, u):
  x = _images()
  t = _t(x)
  _close(dsa.brightness(jnp.asarray(x), u), t + (u - 0.5) * 1.0)
  m = t.mean(dim=1, keepdim=True)
  _close(dsa.saturation(jnp.asarray(x), u), (t - m) * (u * 2.0) + m)
  m = t.mean(dim=[1, 2, 3], keepdim=True)
  _close(dsa.contrast(jnp.asarray(x), u), (t - m) * (u + 0.5) + m)
  # color = brightness, then saturation, then contrast, each with its own draw
  u1, u2, u3 = u, 0.7, 0.1
  y = t + (u1 - 0.5)
  y = (y - y.mean(1, keepdim=True)) * (u2 * 2.0) + y.mean(1, keepdim=True)
  y = (y - y.mean([1, 2, 3], keepdim=True)) * (u3 + 0.5) + y.mean([1, 2, 3], keepdim=True)
  _close(dsa.color(jnp.asarray(x), u1, u2, u3), y)


def test_flip_mirrors_the_width_when_u_below_one_half(x64):
  x = _images()
  _close(dsa.flip(jnp.asarray(x), 0.49), torch.flip(_t(x), [3]))
  _close(dsa.flip(jnp.asarray(x), 0.5), _t(x))


@pytest.mark.parametrize("tx, ty", [(0, 0), (-1, 2), (1, -2), (-1, -2), (2, 3), (-2, -3)])
def test_crop_is_a_shift_with_zero_padding(x64, tx, ty):
  """Pad by s (the code's int(size * 0.125 + 0.5) per axis) and cut the window at s + t."""
  x = _images()
  sh, sw = int(H * 0.125 + 0.5), int(W * 0.125 + 0.5)
  assert (dsa.crop_shift(H), dsa.crop_shift(W)) == (sh, sw) == (1, 2)
  if abs(tx) > sh or abs(ty) > sw:
    sh, sw = 3, 3  # (also exact beyond the code's range)
  p = F.pad(_t(x), [sw, sw, sh, sh])
  _close(dsa.crop(jnp.asarray(x), tx, ty), p[:, :, sh + tx : sh + tx + H, sw + ty : sw + ty + W])


@pytest.mark.parametrize("ox, oy", [(0, 0), (3, 7), (H - 1, W), (5, 15), (9, 16)])
def test_cutout_zeroes_the_code_clamped_square(x64, ox, oy):
  """The code's mask: rows clamp(k + ox - size // 2, 0, H - 1) for k < size (same for cols)."""
  x = _images()
  ch, cw = int(H * 0.5 + 0.5), int(W * 0.5 + 0.5)
  assert (dsa.cutout_size(H), dsa.cutout_size(W)) == (ch, cw) == (5, 8)
  mask = torch.ones(H, W, dtype=torch.float64)
  for a in range(ch):
    for b in range(cw):
      mask[min(max(a + ox - ch // 2, 0), H - 1), min(max(b + oy - cw // 2, 0), W - 1)] = 0
  _close(dsa.cutout(jnp.asarray(x), ox, oy), _t(x) * mask)


def _torch_affine(x, theta):
  t = _t(x)
  grid = F.affine_grid(torch.tensor([theta] * B, dtype=t.dtype), list(t.shape), align_corners=False)
  return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@pytest.mark.parametrize("u", [0.0, 0.2, 0.5, 0.93])
def test_affine_ops_are_torch_affine_grid_and_grid_sample(x64, u):
  """scale: diag(sx, sy), s = u (1.2 - 1/1.2) + 1/1.2; rotate: t = (u - 0.5) 2 * 15 degrees,
  theta = [[cos t, sin(-t), 0], [sin t, cos t, 0]] (param_aug.py's ``rand_rotate``)."""
  x = _images()
  lo = 1 / 1.2
  sx, sy = u * (1.2 - lo) + lo, (1 - u) * (1.2 - lo) + lo
  _close(
    dsa.scale(jnp.asarray(x), jnp.asarray(u), jnp.asarray(1 - u)),
    _torch_affine(x, [[sx, 0, 0], [0, sy, 0]]),
  )
  t = (u - 0.5) * 2 * 15.0 / 180 * math.pi
  theta = [[math.cos(t), math.sin(-t), 0], [math.sin(t), math.cos(t), 0]]
  _close(dsa.rotate(jnp.asarray(x), jnp.asarray(u)), _torch_affine(x, theta))


def _torch_op(name, x, p):
  """The torch side of one strategy with the draw ``p``."""
  t, p = _t(x), [float(v) for v in p]
  if name == "color":
    y = t + (p[0] - 0.5)
    y = (y - y.mean(1, keepdim=True)) * (p[1] * 2.0) + y.mean(1, keepdim=True)
    return (y - y.mean([1, 2, 3], keepdim=True)) * (p[2] + 0.5) + y.mean([1, 2, 3], keepdim=True)
  if name == "flip":
    return torch.flip(t, [3]) if p[0] < 0.5 else t
  if name == "scale":
    lo = 1 / 1.2
    return _torch_affine(x, [[p[0] * (1.2 - lo) + lo, 0, 0], [0, p[1] * (1.2 - lo) + lo, 0]])
  if name == "rotate":
    a = (p[0] - 0.5) * 2 * 15.0 / 180 * math.pi
    return _torch_affine(x, [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]])
  if name == "crop":
    tx, ty = int(p[0]), int(p[1])
    q = F.pad(t, [2, 2, 1, 1])
    return q[:, :, 1 + tx : 1 + tx + H, 2 + ty : 2 + ty + W]
  ox, oy = int(p[0]), int(p[1])  # cutout
  mask = torch.ones(H, W, dtype=t.dtype)
  for a in range(5):
    for b in range(8):
      mask[min(max(a + ox - 2, 0), H - 1), min(max(b + oy - 4, 0), W - 1)] = 0
  return t * mask


def test_one_call_is_one_uniform_strategy_with_the_draw_in_range(x64):
  """Per key: the chosen strategy applied with ``draw``'s parameters, all from torch; the
  strategies are uniform over the code's string and the integer draws cover the code's ranges."""
  x = _images()
  names = dsa.parse(dsa.STRATEGY)
  assert names == ("color", "crop", "cutout", "flip", "scale", "rotate")
  aug = jax.jit(lambda x, k: dsa.augment(x, k))
  for s in range(24):
    key = jax.random.PRNGKey(s)
    name = names[int(dsa.choose(key, names))]
    p = dsa.draw(jax.random.fold_in(key, 1), x.shape, jnp.float64)[name]
    _close(aug(jnp.asarray(x), key), _torch_op(name, x, p))
  keys = jax.random.split(jax.random.PRNGKey(0), 6000)
  counts = np.bincount(np.asarray(jax.vmap(lambda k: dsa.choose(k, names))(keys)), minlength=6)
  assert counts.min() > 900 and counts.max() < 1100, counts  # 1000 each expected
  d = jax.vmap(lambda k: dsa.draw(k, x.shape, jnp.float64))(keys[:2000])
  assert sorted(set(np.asarray(d["crop"][0]).tolist())) == [-1, 0, 1]  # int(10 * .125 + .5)
  assert sorted(set(np.asarray(d["crop"][1]).tolist())) == [-2, -1, 0, 1, 2]
  assert sorted(set(np.asarray(d["cutout"][0]).tolist())) == list(range(H))  # size 5 is odd
  assert sorted(set(np.asarray(d["cutout"][1]).tolist())) == list(range(W + 1))  # size 8
  u = np.asarray(d["rotate"][0])
  assert 0 <= u.min() < 0.01 and 0.99 < u.max() < 1


def test_one_draw_for_the_whole_batch(x64):
  """Siamese: a batch of one image repeated comes out as one image repeated, for every
  strategy; and example i is augmented as the batch of it alone (no per-example draw)."""
  one = _images()[:1]
  x = jnp.asarray(np.repeat(one, 4, axis=0))
  mixed = jnp.asarray(_images(1))
  aug = jax.jit(dsa.augment)
  for s in range(30):
    key = jax.random.PRNGKey(100 + s)
    y = np.asarray(aug(x, key))
    np.testing.assert_array_equal(y, np.repeat(y[:1], 4, axis=0))
    z = np.asarray(aug(mixed, key))
    for i in range(B):
      np.testing.assert_allclose(z[i], np.asarray(aug(mixed[i : i + 1], key))[0], atol=1e-12)


def test_vmap_equals_one_call_per_client(x64):
  xs = jnp.asarray(np.stack([_images(s) for s in range(4)]))
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  batched = jax.jit(jax.vmap(dsa.augment))(xs, keys)
  for i in range(4):
    np.testing.assert_allclose(batched[i], dsa.augment(xs[i], keys[i]), rtol=0, atol=1e-12)


def test_single_strategy_and_none_and_bad_names():
  x = jnp.ones((2, 8, 8, 3))
  np.testing.assert_array_equal(dsa.augment(x, jax.random.PRNGKey(0), "none"), x)
  y = dsa.augment(x, jax.random.PRNGKey(0), "flip")
  np.testing.assert_array_equal(y, x)  # a constant image is its own mirror
  with pytest.raises(ValueError, match="blur"):
    dsa.parse("color_blur")
