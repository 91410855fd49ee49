"""Oracles for the on-device input pipeline: ``normalize`` and ``augment`` (crop + flip).

Every output of ``augment`` must be a window of the zero-padded image at offsets in [0, 2p]
(mirrored or not); the tests identify which window by matching against all of them, so a
no-op, a too-narrow offset range, a missing flip or a per-batch path that draws per example
all fail.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedllava.data.augment import augment, normalize

H, W, C = 6, 5, 3


def _images(b, seed=0):
  """Distinct pixel values in [1, 2): every window of the padded image is unique."""
  x = np.random.default_rng(seed).permutation(b * H * W * C).reshape(b, H, W, C)
  return (1.0 + x / x.size).astype(np.float32)


def _windows(img, p):
  """{(dy, dx, flipped): window} for every offset in [0, 2p]^2 of the zero-padded image."""
  padded = np.pad(img, ((p, p), (p, p), (0, 0)))
  out = {}
  for dy, dx in itertools.product(range(2 * p + 1), repeat=2):
    win = padded[dy : dy + H, dx : dx + W]
    out[(dy, dx, False)] = win
    out[(dy, dx, True)] = win[:, ::-1]
  return out


def _identify(out, img, p):
  """The one (dy, dx, flipped) whose window equals ``out``; fails if none matches."""
  hits = [k for k, win in _windows(img, p).items() if np.array_equal(win, out)]
  assert len(hits) == 1, f"output is not a window of the padded image at [0, {2 * p}] ({hits})"
  return hits[0]


def _draws(p, flip, per_batch, num_keys=60, b=8):
  images = _images(b)
  fn = jax.jit(lambda x, k: augment(x, k, p, flip, per_batch))
  draws = []
  for s in range(num_keys):
    out = np.asarray(fn(jnp.asarray(images), jax.random.PRNGKey(s)))
    draws.append([_identify(out[i], images[i], p) for i in range(b)])
  return draws  # [num_keys][b] of (dy, dx, flipped)


def test_crop_offsets_cover_0_to_2p_and_no_flip_when_off():
  p = 2
  draws = [d for row in _draws(p, flip=False, per_batch=False) for d in row]
  offsets = {(dy, dx) for dy, dx, _ in draws}
  # 480 draws over 25 offsets: every offset, both extremes included, occurs.
  assert offsets == set(itertools.product(range(2 * p + 1), repeat=2))
  assert not any(f for _, _, f in draws)


def test_flip_half_of_the_time_without_crop():
  draws = [d for row in _draws(0, flip=True, per_batch=False, num_keys=100) for d in row]
  assert {(dy, dx) for dy, dx, _ in draws} == {(0, 0)}
  share = np.mean([f for _, _, f in draws])
  assert 0.4 < share < 0.6, share  # 800 fair coins: sd 0.018


def test_crop_and_flip_together():
  draws = [d for row in _draws(1, flip=True, per_batch=False) for d in row]
  assert len(set(draws)) == 9 * 2  # every offset, mirrored and not


def test_examples_draw_independently():
  images = _images(16)
  out = np.asarray(augment(jnp.asarray(images), jax.random.PRNGKey(3), 2, True, False))
  draws = [_identify(out[i], images[i], 2) for i in range(16)]
  assert len(set(draws)) > 4  # one key, yet different examples get different crops/flips


def test_per_batch_shares_one_crop_and_flip():
  rows = _draws(2, flip=True, per_batch=True, num_keys=40)
  for row in rows:
    assert len(set(row)) == 1  # the whole batch: one offset, one flip (CReFF)
  firsts = [row[0] for row in rows]
  assert len({(dy, dx) for dy, dx, _ in firsts}) > 5  # but it is random over steps
  assert 0 < sum(f for _, _, f in firsts) < len(firsts)


def test_padded_batch_prefix_is_augmented_like_the_unpadded_batch():
  images = jnp.asarray(_images(8))
  key = jax.random.PRNGKey(9)
  full = augment(images, key, 2, True, False)
  part = augment(images[:5], key, 2, True, False)
  np.testing.assert_array_equal(full[:5], part)


@pytest.mark.parametrize("per_batch", [False, True])
def test_no_padding_no_flip_is_the_identity(per_batch):
  images = jnp.asarray(_images(4))
  out = augment(images, jax.random.PRNGKey(0), 0, False, per_batch)
  np.testing.assert_array_equal(out, images)
  assert out.dtype == images.dtype and out.shape == images.shape


def test_augment_keeps_dtype(x64):
  images = jnp.asarray(_images(3), jnp.float64)
  out = augment(images, jax.random.PRNGKey(0), 1, True, False)
  assert out.dtype == jnp.float64


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _u8(b=4):
  return np.random.default_rng(1).integers(0, 256, (b, H, W, C), dtype=np.uint8)


def test_normalize_by_hand_float32():
  x = _u8()
  want = (x.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
  out = normalize(jnp.asarray(x), MEAN, STD)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
  assert np.abs(np.asarray(out, np.float64) - want).max() > 0  # really float32


def test_normalize_by_hand_float64(x64):
  x = _u8()
  want = (x.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
  out = normalize(jnp.asarray(x), MEAN, STD, jnp.float64)
  assert out.dtype == jnp.float64
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-14)
  # Per channel: channel c uses mean[c] / std[c].
  np.testing.assert_allclose(out[..., 2], (x[..., 2] / 255.0 - MEAN[2]) / STD[2], atol=1e-14)
