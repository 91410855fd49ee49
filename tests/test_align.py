"""Stage 3 oracles: Eq. 6 by hand, what moves, the q cache, and alignment on digits-LT."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedllava import align, main
from fedllava.data import classnames, federated
from fedllava.models import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits_lt  # noqa: E402  pylint: disable=g-import-not-at-top


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_loss_equals_a_hand_computation():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(3, 4))
  q = rng.normal(size=(3, 4)) * 3
  y = np.array([0, 3, 1])
  w = np.array([1.0, 1.0, 0.0])  # the third example is padding
  beta, t = 0.7, 2.0
  ce = -np.log(_softmax(p)[np.arange(3), y])
  qs, ps = _softmax(q / t), _softmax(p / t)
  kl_qp = np.sum(qs * (np.log(qs) - np.log(ps)), -1)
  expected = np.sum(w * (ce + beta * kl_qp)) / w.sum()
  got, aux = align.alignment_loss(
    jnp.asarray(p), jnp.asarray(y), jnp.asarray(q), jnp.asarray(w), beta, t
  )
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  np.testing.assert_allclose(float(aux["ce"]), np.sum(w * ce) / 2, rtol=1e-6)
  # The KL direction: KL(p || q) is a different number, and the loss is not it.
  kl_pq = np.sum(ps * (np.log(ps) - np.log(qs)), -1)
  wrong = np.sum(w * (ce + beta * kl_pq)) / w.sum()
  assert abs(wrong - expected) > 1e-3
  swapped, _ = align.alignment_loss(
    jnp.asarray(q), jnp.asarray(y), jnp.asarray(p), jnp.asarray(w), beta, t
  )
  assert abs(float(swapped) - float(got)) > 1e-3
  with pytest.raises(ValueError, match="teacher_logits"):
    align.alignment_loss(jnp.asarray(p), jnp.asarray(y), None, jnp.asarray(w), 0.5)


def _tiny_model_and_data(n=12, num_classes=3, seed=0):
  cfg = digits_lt.get_config("tiny").model
  model = resnet.create_model(cfg, num_classes)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, size=n).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 3)))
  return model, variables, images, labels


def _align_cfg(**over):
  c = digits_lt.get_config("tiny").align
  c.update(dict(beta=0.0, epochs=1, momentum=0.0, learning_rate=0.1, optimizer="sgd"))
  c.update(over)
  return c


def test_beta_zero_is_plain_cross_entropy_finetuning():
  """One full-batch epoch with beta = 0 is one SGD step on the CE loss, computed here by hand."""
  model, variables, images, labels = _tiny_model_and_data()
  n = len(labels)
  cfg = _align_cfg(batch_size=n, bn="train", params="all")
  fn = align.create_aligner(model, cfg, num_examples=n, mean=0.5, std=0.25)
  q = jnp.asarray(np.random.default_rng(1).normal(size=(n, 3)), jnp.float32)
  out, _ = fn(variables, images, labels, q, jax.random.PRNGKey(3))

  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.25

  def ce(params):
    o, new = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    return optax.softmax_cross_entropy_with_integer_labels(o["logits"], labels).mean(), new

  (_, new), g = jax.value_and_grad(ce, has_aux=True)(variables["params"])
  expected = jax.tree.map(lambda w, gw: w - 0.1 * gw, variables["params"], g)
  for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out["batch_stats"]), jax.tree.leaves(new["batch_stats"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  # With beta > 0 the same q changes the result: q is used.
  fn_kl = align.create_aligner(
    model, _align_cfg(batch_size=n, beta=1.0), num_examples=n, mean=0.5, std=0.25
  )
  out_kl, m = fn_kl(variables, images, labels, q, jax.random.PRNGKey(3))
  assert float(m["align/kl"]) > 0
  assert not np.allclose(
    np.asarray(out_kl["params"]["classifier"]["kernel"]),
    np.asarray(out["params"]["classifier"]["kernel"]),
  )


def test_head_only_leaves_the_backbone_bit_identical_and_all_moves_it():
  model, variables, images, labels = _tiny_model_and_data()
  n = len(labels)
  key = jax.random.PRNGKey(0)
  head = align.create_aligner(
    model, _align_cfg(batch_size=5, params="head", epochs=2), num_examples=n, mean=0.5, std=0.25
  )
  out, _ = head(variables, images, labels, None, key)
  flat_in = jax.tree_util.tree_flatten_with_path(variables)[0]
  flat_out = dict(jax.tree_util.tree_flatten_with_path(out)[0])
  moved = []
  for path, x in flat_in:
    same = np.array_equal(np.asarray(x), np.asarray(flat_out[path]))
    if "classifier" in jax.tree_util.keystr(path):
      moved.append(not same)
    else:
      assert same, jax.tree_util.keystr(path)
  assert moved and all(moved)  # the head did move
  full = align.create_aligner(
    model, _align_cfg(batch_size=5, params="all", epochs=2), num_examples=n, mean=0.5, std=0.25
  )
  out_all, _ = full(variables, images, labels, None, key)
  conv = lambda v: np.asarray(jax.tree.leaves(v["params"]["conv1"])[0])  # noqa: E731
  assert not np.array_equal(conv(out_all), conv(variables))
  assert not np.array_equal(
    np.asarray(jax.tree.leaves(out_all["batch_stats"])[0]),
    np.asarray(jax.tree.leaves(variables["batch_stats"])[0]),
  )


class _CountingTeacher:
  """A stand-in CLIP: counts loads and calls; logits are a fixed function of the pixels."""

  loads = 0

  def __init__(self, name):
    type(self).loads += 1

  def class_embeddings(self, names, templates):
    self.num_classes = len(names)
    return np.eye(len(names), dtype=np.float32)

  def zero_shot_logits(self, images, emb, batch_size=None):
    x = np.asarray(images, np.float32).reshape(len(images), -1)
    return x[:, : self.num_classes] / 255.0


def test_q_cache_reads_and_recomputes(tmp_path):
  cfg = digits_lt.get_config("tiny")
  cfg.align.teacher = "fake"
  cfg.align.beta = 1.0
  server = federated.build_server_data(cfg)
  dset = align.align_set(cfg, server)
  names = classnames.get_classnames("digits")
  _CountingTeacher.loads = 0
  q1 = align.zero_shot_q(cfg, dset, names, str(tmp_path), _CountingTeacher)
  q2 = align.zero_shot_q(cfg, dset, names, str(tmp_path), _CountingTeacher)
  assert _CountingTeacher.loads == 1  # the second call read the cache
  np.testing.assert_array_equal(q1, q2)
  assert q1.shape == (len(dset.labels), 10)
  cfg.align.templates = "default"  # a changed template set recomputes
  align.zero_shot_q(cfg, dset, names, str(tmp_path), _CountingTeacher)
  assert _CountingTeacher.loads == 2
  cfg.align.per_class = 5  # a changed hold-out recomputes
  dset5 = align.align_set(cfg, federated.build_server_data(cfg))
  align.zero_shot_q(cfg, dset5, names, str(tmp_path), _CountingTeacher)
  assert _CountingTeacher.loads == 3
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_holdout_is_disjoint_from_clients_and_balanced():
  cfg = digits_lt.get_config("tiny")
  data = federated.build(cfg)
  server = federated.build_server_data(cfg)
  np.testing.assert_array_equal(data.align_indices, server.align_indices)
  assert np.bincount(server.align.labels, minlength=10).tolist() == [10] * 10
  np.testing.assert_array_equal(data.class_counts, server.class_counts)
  # No held-out image reaches a client: compare pixels (indices are positions in other pools).
  held = {im.tobytes() for im in server.align.images}
  client_images = {
    data.images[k, i].tobytes() for k in range(len(data.sizes)) for i in range(data.sizes[k])
  }
  assert not held & client_images


def test_user_folder_d_align(tmp_path):
  from PIL import Image

  root = tmp_path / "dalign"
  for name in ("zero", "seven"):
    (root / name).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
  d = align.load_folder(str(root), classnames.get_classnames("digits"), (8, 8))
  assert d.images.shape == (4, 8, 8, 3) and sorted(d.labels.tolist()) == [0, 0, 7, 7]
  assert all(d.labels[i] == (7 if s.startswith("seven/") else 0) for i, s in enumerate(d.ids))
  outside = tmp_path / "secret.png"
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside)
  os.symlink(outside, root / "seven" / "link.png")
  with pytest.raises(ValueError, match="outside"):
    align.load_folder(str(root), classnames.get_classnames("digits"), (8, 8))
  (root / "seven" / "link.png").unlink()
  (root / "cat").mkdir()
  with pytest.raises(ValueError, match="not a class name"):
    align.load_folder(str(root), classnames.get_classnames("digits"), (8, 8))


@pytest.mark.parametrize(
  "override, message",
  [
    ({"align.beta": 1.0, "align.teacher": ""}, "align.teacher"),
    ({"align.beta": -1.0}, "align.beta"),
    ({"align.params": "backbone"}, "align.params"),
    ({"align.when": "sometimes"}, "align.when"),
    ({"align.per_class": 0}, "align.per_class"),
    ({"align.learning_rate": 0.0}, "align.learning_rate"),
    ({"align.temperature": 0.0}, "align.temperature"),
    ({"stages": "align,federate"}, "federate"),
    ({"align.teacher": "/nowhere/clip", "align.beta": 1.0}, "not a directory"),
  ],
)
def test_bad_align_config_names_the_field(override, message):
  cfg = digits_lt.get_config("tiny")
  for k, v in override.items():
    node = cfg
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  with pytest.raises(ValueError, match=message):
    main.validate(cfg)


def _flip_one_byte(data: bytes) -> bytes:
  i = len(data) // 2  # inside q's bytes
  return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


@pytest.mark.parametrize(
  "damage",
  [
    lambda b: b"this is not an npz file at all" * 4,  # garbage
    lambda b: b[: len(b) // 2],  # truncated
    _flip_one_byte,
    lambda b: b"",  # empty
  ],
  ids=["garbage", "truncated", "flipped_byte", "empty"],
)
def test_damaged_q_cache_is_set_aside_and_recomputed(tmp_path, capsys, damage):
  cfg = digits_lt.get_config("tiny")
  cfg.align.teacher, cfg.align.beta = "fake", 1.0
  dset = align.align_set(cfg, federated.build_server_data(cfg))
  names = classnames.get_classnames("digits")
  _CountingTeacher.loads = 0
  q1 = align.zero_shot_q(cfg, dset, names, str(tmp_path), _CountingTeacher)
  (cache,) = [f for f in os.listdir(tmp_path) if f.startswith("zero_shot_q-")]
  good = (tmp_path / cache).read_bytes()
  (tmp_path / cache).write_bytes(damage(good))
  capsys.readouterr()
  q2 = align.zero_shot_q(cfg, dset, names, str(tmp_path), _CountingTeacher)
  assert _CountingTeacher.loads == 2  # recomputed once
  np.testing.assert_array_equal(q1, q2)
  (moved,) = os.listdir(tmp_path / "damaged")  # set aside, not deleted
  assert moved.startswith(cache) and (tmp_path / "damaged" / moved).read_bytes() == damage(good)
  lines = [s for s in capsys.readouterr().out.splitlines() if " is damaged " in s]
  assert len(lines) == 1 and cache in lines[0]
  np.testing.assert_array_equal(
    align.zero_shot_q(cfg, dset, names, str(tmp_path), _CountingTeacher), q1
  )
  assert _CountingTeacher.loads == 2  # the rewritten cache is read


def _d_align(root, classes=("zero", "seven")):
  from PIL import Image

  for name in classes:
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(2):
      Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
  return root


def _break_missing(root, tmp_path):
  return str(tmp_path / "nowhere"), "not a directory"


def _break_empty(root, tmp_path):
  empty = tmp_path / "empty"
  (empty / "zero").mkdir(parents=True)
  return str(empty), "holds no images"


def _break_unreadable(root, tmp_path):
  (root / "seven" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  return str(root), "cannot read seven/bad.png"


def _break_truncated(root, tmp_path):
  from PIL import Image

  noise = np.random.default_rng(0).integers(0, 256, (20, 20, 3), np.uint8)
  Image.fromarray(noise).save(root / "seven" / "1.png")
  data = (root / "seven" / "1.png").read_bytes()
  (root / "seven" / "1.png").write_bytes(data[: len(data) // 2])
  return str(root), "cannot read seven/1.png"


def _break_symlink(root, tmp_path):
  outside = tmp_path / "secret.png"
  (outside).write_bytes((root / "zero" / "0.png").read_bytes())
  os.symlink(outside, root / "seven" / "link.png")
  return str(root), "points outside"


def _break_unknown_class(root, tmp_path):
  _d_align(root, ("cat",))
  return str(root), "'cat' is not a class name"


def _break_bomb(root, tmp_path):
  from PIL import Image

  Image.new("L", (600, 600)).save(root / "zero" / "big.png")  # > 2 x MAX_IMAGE_PIXELS below
  return str(root), "cannot read zero/big.png.*decompression bomb"


@pytest.mark.parametrize(
  "breaks",
  [
    _break_missing,
    _break_empty,
    _break_unreadable,
    _break_truncated,
    _break_symlink,
    _break_unknown_class,
    _break_bomb,
  ],
)
def test_bad_d_align_folder_is_a_config_error_before_anything_runs(tmp_path, monkeypatch, breaks):
  """align.data_dir is checked in validate: the error comes before stage 2 writes anything."""
  from PIL import Image

  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # a 600 x 600 PNG is a "bomb"
  root = _d_align(tmp_path / "dalign")
  cfg = digits_lt.get_config("tiny")
  cfg.align.data_dir = str(root)
  main.validate(cfg)  # the intact folder passes
  cfg.align.data_dir, message = breaks(root, tmp_path)
  with pytest.raises(ValueError, match=message):
    main.validate(cfg)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    main.run(cfg, str(workdir))
  assert not workdir.exists()
