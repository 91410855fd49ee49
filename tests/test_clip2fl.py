"""CLIP2FL oracles: Eq. 1's client distillation loss (numpy, from the paper's formula / the code's
``KDLoss``), Eq. 8's text contrast (numpy ``SupConLoss_text``), the per-example teacher logits
the local step sees (CLIP's zero-shot logits of that very image), and main.run end to end on
digits with a tiny *random* CLIP (mechanics only: a random teacher teaches nothing)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits

from fedllava import errors, main
from fedllava.algorithms import base, clip2fl, creff
from fedllava.federate import client
from fedllava.models import resnet


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_client_loss_is_ce_plus_alpha_kd_from_numpy(x64):
  """Eq. 1: CE + alpha * T^2 * mean_i KL(softmax(t/T) || softmax(s/T)) over real examples.
  Mutations caught: KL direction swapped, T^2 dropped, padding examples counted."""
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(5, 4)) * 3, rng.normal(size=(5, 4)) * 10
  y = np.array([0, 1, 2, 3, 0])
  w = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
  alpha, temp = 0.7, 3.0
  ce = -_log_softmax(s)[np.arange(5), y]
  p = np.exp(_log_softmax(t / temp))
  kl = (p * (np.log(p) - _log_softmax(s / temp))).sum(-1)
  expected = (ce * w).sum() / w.sum() + alpha * temp**2 * (kl * w).sum() / w.sum()
  algo = clip2fl.create(alpha=alpha, temperature=temp)
  got = algo.client_loss({"logits": jnp.asarray(s)}, jnp.asarray(y), jnp.asarray(w), None, side=t)
  np.testing.assert_allclose(float(got), expected, rtol=1e-12)
  # alpha = 0: exactly CReFF's (plain masked cross-entropy), whatever the teacher says
  zero = clip2fl.create(alpha=0.0).client_loss(
    {"logits": jnp.asarray(s)}, jnp.asarray(y), jnp.asarray(w), None, side=t
  )
  plain = creff.create().client_loss({"logits": jnp.asarray(s)}, jnp.asarray(y), jnp.asarray(w))
  assert float(zero) == float(plain)
  np.testing.assert_allclose(float(zero), (ce * w).sum() / w.sum(), rtol=1e-12)


def test_text_contrast_matches_numpy_supcon_text(x64):
  """Eq. 8's ``SupConLoss_text`` (losses.py:98-144) written in numpy, with a single-sample class
  (left out of the mean). Mutations caught: the diagonal kept in the denominator, positives
  counted against the image's own class text instead of the partner's."""
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(7, 3))
  labels = np.array([0, 0, 0, 1, 1, 2, 1])
  text = rng.normal(size=(3, 3))
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  tau = 0.1
  a = feats @ text[labels].T / tau
  n = len(labels)
  losses = []
  for i in range(n):
    others = [j for j in range(n) if j != i]
    pos = [j for j in others if labels[j] == labels[i]]
    if not pos:
      continue
    lse = np.log(np.sum(np.exp(a[i, others])))
    losses.append(-np.mean([a[i, j] - lse for j in pos]))
  got = clip2fl.text_contrast(jnp.asarray(feats / tau), jnp.asarray(labels), jnp.asarray(text))
  np.testing.assert_allclose(float(got), np.mean(losses), rtol=1e-10)


def test_step_sees_the_teacher_logits_of_its_own_examples(tmp_path, tiny_clip_dir):
  """The side rows the client loss receives for a batch are CLIP's zero-shot logits of exactly
  those images (each recomputed alone with the teacher). Mutation caught: the side array not
  gathered with the batch's ``idx`` (the first B rows instead)."""
  from fedllava import zero_shot
  from fedllava.models.clip import ClipTeacher

  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(2, 6, 8, 8, 3), dtype=np.uint8)
  cfg = tiny_digits(1, **{"align.teacher": tiny_clip_dir})
  names = ["zero", "one", "two"]
  side, emb = zero_shot.client_teacher_logits(
    cfg, images, names, "default", str(tmp_path), method="clip2fl"
  )
  assert side.shape == (2, 6, 3) and side.dtype == np.float32
  teacher = ClipTeacher.load(tiny_clip_dir)
  e = teacher.class_embeddings(names, ["a photo of a {}."])
  # cached: a second call reads the file and returns the same arrays
  again, _ = zero_shot.client_teacher_logits(
    cfg, images, names, "default", str(tmp_path), method="clip2fl"
  )
  np.testing.assert_array_equal(again, side)

  seen = []

  def spy_loss(outputs, labels, weights, message, side=None):
    seen.append(np.asarray(side))
    return base.cross_entropy(outputs, labels, weights)

  algo = base.create("spy", client_loss=spy_loss, side_data="teacher_logits")
  model = resnet.create_model(tiny_digits(1).model, 3)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  trainer = client.create_local_trainer(
    model, algo, learning_rate=0.1, mean=(0.5,) * 3, std=(0.5,) * 3, crop_padding=0,
    flip=False, per_batch_augment=False,
  )  # fmt: skip
  k = 1
  idx = jnp.asarray([4, 2, 5])
  trainer.step(
    trainer.init_carry(variables), jnp.asarray(images[k]), jnp.zeros(6, jnp.int32),
    variables["params"], idx, jnp.ones(3), jnp.asarray(True), jax.random.PRNGKey(1), None,
    jnp.asarray(side[k]),
  )  # fmt: skip
  (got,) = seen
  for row, i in zip(got, [4, 2, 5]):
    alone = np.asarray(teacher.zero_shot_logits(images[k, i : i + 1], e))[0]
    np.testing.assert_allclose(row, alone, rtol=1e-5, atol=1e-5)


def test_without_a_teacher_is_a_config_error(tmp_path):
  cfg = tiny_digits(1, stages="federate", **{"fl.algorithm": "clip2fl"})
  cfg.align.teacher = ""
  with pytest.raises(errors.ConfigError, match="config.align.teacher"):
    main.run(cfg, str(tmp_path))


def test_clip2fl_runs_end_to_end_on_digits_with_a_tiny_random_clip(tmp_path, tiny_clip_dir):
  """Mechanics only (a random CLIP): teacher logits cached, gathered, distilled; text contrast
  on the server; gradients uploaded; the re-trained classifier evaluated."""
  cfg = tiny_digits(
    2,
    stages="federate",
    **{
      "fl.algorithm": "clip2fl",
      "align.teacher": tiny_clip_dir,
      "model.width": 4,  # 16 features = the tiny CLIP's projection size (Eq. 8 needs equal)
      "fl.creff.retrain_epochs": 3,
      "fl.creff.match_steps": 5,
    },
  )
  out = main.run(cfg, str(tmp_path))["federate"]
  assert 0 <= out.report["final"]["top1"] <= 100
  text = (tmp_path / "federate" / "metrics.jsonl").read_text().split("\n")[:-1]
  rows = [json.loads(s) for s in text]
  assert rows[-1]["comm/upload_bytes_per_client/gradients"] > 0
  assert np.isfinite(rows[-1]["server/match_loss"])
  assert list((tmp_path / "federate" / "teacher").glob("client_zero_shot-*.npz"))
