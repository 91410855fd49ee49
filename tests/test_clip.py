"""Oracle tests for the CLIP teacher: transformers' PyTorch CLIP on a tiny random checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_clip_config, write_clip_tokenizer_files

from fedllava.data import classnames as cn
from fedllava.models import clip, clip_loading

IMAGE, PATCH, WIDTH, PROJ, CONTEXT = 16, 4, 32, 16, 40
CLASSES = ["cat", "dog", "the ship"]
TEMPLATES = ["a photo of a {}.", "the {}"]


def _write_tokenizer_files(d):
  return write_clip_tokenizer_files(d)


def _config(vocab_size):
  return tiny_clip_config(vocab_size, IMAGE, PATCH, WIDTH, PROJ, CONTEXT)


@pytest.fixture(scope="module")
def pt_ckpt(tmp_path_factory):
  """A random PyTorch CLIPModel saved as safetensors, with a CLIP tokenizer, in one directory."""
  torch = pytest.importorskip("torch", reason="PyTorch is the reference oracle for the Flax CLIP")
  from transformers import CLIPModel, CLIPTokenizer

  d = tmp_path_factory.mktemp("clip_pt")
  vocab_size = _write_tokenizer_files(d)
  CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(d)
  torch.manual_seed(0)
  model = CLIPModel(_config(vocab_size)).eval()
  model.save_pretrained(d, safe_serialization=True)
  return d, model


def _pixels(n=2, seed=0):
  return np.random.RandomState(seed).randn(n, IMAGE, IMAGE, 3).astype(np.float32)


def _nchw(x):
  import torch

  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ----------------------------------------------------------------------------- PyTorch oracles


def test_grid_features_match_torch(pt_ckpt):
  import torch

  d, pt = pt_ckpt
  model, params = clip_loading.load_clip(str(d))
  x = _pixels()
  got = jax.jit(lambda p, x: clip.grid_features(model, p, x))(params, x)
  with torch.no_grad():
    hs = pt.vision_model(_nchw(x), output_hidden_states=True).hidden_states
  assert got.shape == (2, (IMAGE // PATCH) ** 2, WIDTH)
  assert _max_diff(got, hs[-2][:, 1:].numpy()) < 1e-4
  last = clip.grid_features(model, params, x, layer=-1)  # the layer index is honoured
  assert _max_diff(last, hs[-1][:, 1:].numpy()) < 1e-4


def test_zero_shot_logits_match_torch(pt_ckpt):
  import torch

  d, pt = pt_ckpt
  teacher = clip.ClipTeacher.load(str(d))  # tokenizer through AutoTokenizer, as in real use
  assert teacher.image_size == IMAGE and teacher.tokenizer is not None
  emb = teacher.class_embeddings(CLASSES, TEMPLATES)
  x = _pixels(3, seed=1)
  got = clip.zero_shot_logits(teacher.model, teacher.params, x, emb)

  prompts = [t.format(c) for c in CLASSES for t in TEMPLATES]
  tok = teacher.tokenizer(prompts, padding="max_length", max_length=CONTEXT, return_tensors="pt")
  with torch.no_grad():
    text = pt.get_text_features(**tok)
    text = text / text.norm(dim=-1, keepdim=True)
    text = text.view(len(CLASSES), len(TEMPLATES), -1).mean(1)
    text = text / text.norm(dim=-1, keepdim=True)
    img = pt.get_image_features(_nchw(x))
    img = img / img.norm(dim=-1, keepdim=True)
    want = (pt.logit_scale.exp() * img @ text.T).numpy()
  assert got.shape == (3, len(CLASSES)) and got.dtype == jnp.float32
  assert _max_diff(emb, text.numpy()) < 1e-5
  assert _max_diff(got, want) < 1e-4

  # One template: exactly torch's own CLIPModel forward.
  emb1 = teacher.class_embeddings(CLASSES)
  tok1 = teacher.tokenizer(
    [f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt"
  )
  with torch.no_grad():
    want1 = pt(**tok1, pixel_values=_nchw(x)).logits_per_image.numpy()
  assert _max_diff(clip.zero_shot_logits(teacher.model, teacher.params, x, emb1), want1) < 1e-4


def test_teacher_uint8_path_and_batching(pt_ckpt):
  d, _ = pt_ckpt
  teacher = clip.ClipTeacher.load(str(d))
  emb = teacher.class_embeddings(CLASSES, TEMPLATES)
  images = np.random.RandomState(2).randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
  direct = clip.zero_shot_logits(teacher.model, teacher.params, clip.preprocess(images, IMAGE), emb)
  assert _max_diff(teacher.zero_shot_logits(images, emb), direct) < 1e-5
  assert _max_diff(teacher.zero_shot_logits(images, emb, batch_size=2), direct) < 1e-5
  grid = teacher.grid_features(images, batch_size=2)
  assert grid.shape == (5, (IMAGE // PATCH) ** 2, WIDTH)
  assert (
    _max_diff(
      grid, clip.grid_features(teacher.model, teacher.params, clip.preprocess(images, IMAGE))
    )
    < 1e-5
  )


def test_bin_and_sharded_weights_load_the_same(pt_ckpt, tmp_path):
  import shutil

  d, pt = pt_ckpt
  _, ref = clip_loading.load_clip(str(d))
  flat_ref = jax.tree_util.tree_leaves_with_path(ref)
  for name, kwargs in [
    ("bin", dict(safe_serialization=False)),
    ("sharded", dict(safe_serialization=True, max_shard_size="100KB")),
  ]:
    out = tmp_path / name
    pt.save_pretrained(out, **kwargs)
    if name == "sharded":
      assert (out / "model.safetensors.index.json").exists()
    _, params = clip_loading.load_clip(str(out))
    got = dict(jax.tree_util.tree_leaves_with_path(params))
    assert len(got) == len(flat_ref)
    for path, value in flat_ref:
      np.testing.assert_array_equal(
        np.asarray(got[path]), np.asarray(value), err_msg=f"{name} {path}"
      )
  shutil.rmtree(tmp_path / "bin")


def test_vision_only_checkpoint(pt_ckpt, tmp_path):
  import torch
  from transformers import CLIPVisionModel, FlaxCLIPVisionModel

  d, pt = pt_ckpt
  vis = CLIPVisionModel(pt.config.vision_config).eval()
  vis.vision_model.load_state_dict(pt.vision_model.state_dict())
  vis.save_pretrained(tmp_path)
  teacher = clip.ClipTeacher.load(str(tmp_path))
  assert isinstance(teacher.model, FlaxCLIPVisionModel) and teacher.tokenizer is None
  x = _pixels()
  with torch.no_grad():
    want = vis(_nchw(x), output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
  assert _max_diff(clip.grid_features(teacher.model, teacher.params, x), want) < 1e-4
  with pytest.raises(ValueError, match="tokenizer"):
    teacher.class_embeddings(CLASSES)


def test_bfloat16_load(pt_ckpt):
  d, _ = pt_ckpt
  model, params = clip_loading.load_clip(str(d), dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree_util.tree_leaves(params))
  _, params32 = clip_loading.load_clip(str(d))
  x = _pixels()
  got = clip.grid_features(model, params, x)
  assert got.dtype == jnp.bfloat16
  assert _max_diff(got, clip.grid_features(model, params32, x)) < 0.1


# ----------------------------------------------------------------------------- no torch needed


def test_flax_directory_loads(tmp_path):
  from transformers import FlaxCLIPModel

  config = _config(_write_tokenizer_files(tmp_path))
  flax_model = FlaxCLIPModel(
    config, _do_init=False
  )  # random values of the right shapes: no slow init
  rng = np.random.RandomState(3)
  ref = jax.tree_util.tree_map(
    lambda s: np.asarray(rng.randn(*s.shape), np.float32), flax_model.params_shape_tree
  )
  flax_model.save_pretrained(tmp_path, params=ref)
  assert (tmp_path / "flax_model.msgpack").exists()
  model, params = clip_loading.load_clip(str(tmp_path))
  assert isinstance(model, FlaxCLIPModel)
  want = dict(jax.tree_util.tree_leaves_with_path(ref))
  got = dict(jax.tree_util.tree_leaves_with_path(params))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_bad_directories(tmp_path):
  from transformers import CLIPConfig

  with pytest.raises(ValueError, match="no config.json"):
    clip_loading.load_clip(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match=r"model_type='llama'.*clip"):
    clip_loading.load_clip(str(tmp_path))
  CLIPConfig().to_json_file(tmp_path / "config.json")
  with pytest.raises(ValueError, match="no weights"):
    clip_loading.load_clip(str(tmp_path))
  with pytest.raises(ValueError, match="not a directory"):
    clip_loading.load_clip(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="not a directory"):
    clip_loading.load_clip(str(tmp_path / "config.json"))


def test_missing_hub_name_offline():
  # conftest sets HF_HUB_OFFLINE=1: an uncached hub name fails with a message, not a download.
  with pytest.raises(ValueError, match="no config.json found.*hub"):
    clip_loading.load_clip("nonexistent-org/nonexistent-clip")


def test_bin_weights_without_torch(tmp_path, monkeypatch):
  import sys

  from transformers import CLIPConfig

  CLIPConfig().to_json_file(tmp_path / "config.json")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match="needs torch"):
    clip_loading.load_clip(str(tmp_path))


def test_preprocess_shapes_identity_and_jit():
  rng = np.random.RandomState(0)
  for h, w in [(32, 32), (50, 40), (40, 50), (8, 8)]:
    out = clip.preprocess(rng.randint(0, 256, (2, h, w, 3)).astype(np.uint8), IMAGE)
    assert out.shape == (2, IMAGE, IMAGE, 3) and out.dtype == jnp.float32
  img = rng.randint(0, 256, (3, IMAGE, IMAGE, 3)).astype(np.uint8)
  manual = (img / 255.0 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
  jitted = jax.jit(clip.preprocess, static_argnums=1)
  np.testing.assert_allclose(np.asarray(jitted(img, IMAGE)), manual, atol=1e-5)
  np.testing.assert_allclose(np.asarray(clip.preprocess(img[0], IMAGE)), manual[:1], atol=1e-5)
  grey = clip.preprocess(img[..., :1], IMAGE)  # one channel is repeated to RGB
  grey_manual = (img[..., :1] / 255.0 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
  np.testing.assert_allclose(np.asarray(grey), grey_manual, atol=1e-5)
  # a wider image at the right height is centre-cropped without resizing
  wide = rng.randint(0, 256, (1, IMAGE, IMAGE + 6, 3)).astype(np.uint8)
  manual_wide = (wide[:, :, 3 : 3 + IMAGE] / 255.0 - np.array(clip.CLIP_MEAN)) / np.array(
    clip.CLIP_STD
  )
  np.testing.assert_allclose(np.asarray(clip.preprocess(wide, IMAGE)), manual_wide, atol=1e-5)


def test_preprocess_matches_clip_image_processor():
  """Exact without a resize; with one, PIL's fixed-point bicubic may differ by a uint8 level or two.

  Our resize follows PIL's (width pass, then height pass, each rounded to uint8), so the remaining
  differences are PIL's fixed-point rounding: checked here as at most 2.5 uint8 levels anywhere and
  0.05 levels on average (measured: max 1-2 levels, mean <0.02).
  """
  pytest.importorskip("PIL", reason="CLIPImageProcessor resizes with Pillow")
  from transformers import CLIPImageProcessor

  proc = CLIPImageProcessor(
    size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
  )
  rng = np.random.RandomState(0)
  level = np.array(clip.CLIP_STD) * 255.0  # one uint8 level in normalised units, per channel
  for h, w in [(IMAGE, IMAGE), (IMAGE, IMAGE + 5), (32, 32), (50, 40), (12, 12), (8, 8)]:
    images = rng.randint(0, 256, (2, h, w, 3)).astype(np.uint8)
    want = proc(list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    diff_levels = np.abs(np.asarray(clip.preprocess(images, IMAGE)) - want) * level
    if min(h, w) == IMAGE:
      assert diff_levels.max() < 1e-3, (h, w)
    else:
      assert diff_levels.max() < 2.5 and diff_levels.mean() < 0.05, (h, w, diff_levels.max())


# ----------------------------------------------------------------------------- class names


def test_classnames():
  for name, n in [("cifar10", 10), ("CIFAR-100", 100), ("imagenet", 1000), ("digits", 10)]:
    names = cn.get_classnames(name)
    assert len(names) == n and len(set(names)) == n, name
  assert cn.get_classnames("cifar10_lt") == cn.get_classnames("cifar10")
  assert cn.get_classnames("imagenet_lt")[:2] == ["tench", "goldfish"]
  assert cn.get_classnames("cifar100")[:3] == ["apple", "aquarium fish", "baby"]
  assert cn.get_classnames("cifar10")[0] == "airplane" and cn.get_classnames("digits")[9] == "nine"
  inet = cn.get_classnames("imagenet")
  assert inet[657] == "missile" and inet[744] == "projectile" and inet[837] == "sunglasses"
  with pytest.raises(ValueError, match="no class names for dataset 'svhn'"):
    cn.get_classnames("svhn")
  assert cn.get_templates() == ["a photo of a {}."]
  assert len(cn.get_templates("ensemble")) == 18 and len(cn.get_templates("imagenet")) == 80
  assert all(t.count("{}") == 1 for t in cn.get_templates("imagenet") + cn.get_templates("cifar"))
  with pytest.raises(ValueError, match="no prompt templates"):
    cn.get_templates("nope")
