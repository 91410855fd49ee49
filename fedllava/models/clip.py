"""The CLIP teacher: transformers' Flax CLIP, loaded from Flax or PyTorch weights.

Two uses in this project:
  * stage 3 (global alignment): zero-shot logits ``q`` from class-name prompts (Radford et al., 2021,
    "Learning Transferable Visual Models From Natural Language Supervision");
  * the LLaVA-1.5 vision tower: the patch grid of the second-to-last layer, CLS dropped (Liu et al.,
    2023, "Improved Baselines with Visual Instruction Tuning").

Weights are read without unpickling (msgpack or safetensors); a ``pytorch_model.bin`` needs torch and
is read with ``torch.load(weights_only=True)``. ``trust_remote_code`` is never used.

Images are NHWC throughout: ``preprocess`` returns what the Flax CLIP *module* takes (the
``FlaxCLIPModel.__call__`` wrapper would take NCHW and transpose it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import AutoTokenizer, FlaxCLIPModel, FlaxCLIPVisionModel
from transformers.models.clip.configuration_clip import CLIPConfig, CLIPVisionConfig

from fedllava import batching
from fedllava.models.safetensors_io import read_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MODEL_TYPES = {
  "clip": (CLIPConfig, FlaxCLIPModel),
  "clip_vision_model": (CLIPVisionConfig, FlaxCLIPVisionModel),
}
# Weight files in the order they are preferred; the index files list shards.
_FLAX, _FLAX_INDEX = "flax_model.msgpack", "flax_model.msgpack.index.json"
_SAFE, _SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def _file_getter(path_or_name: str) -> Callable[[str], Optional[str]]:
  """Returns ``get(filename) -> local path or None`` for a local directory or a hub name."""
  if os.path.isdir(path_or_name):
    return lambda f: p if os.path.isfile(p := os.path.join(path_or_name, f)) else None
  if os.path.exists(path_or_name) or path_or_name.startswith(("/", ".", "~")):
    raise ValueError(
      f"CLIP checkpoint {path_or_name!r} is not a directory (expected a checkpoint "
      "directory with config.json and weights, or a Hugging Face hub name)"
    )
  from transformers.utils import cached_file  # hub names only; honours HF_HUB_OFFLINE and the cache

  @functools.lru_cache(maxsize=None)  # one hub lookup per file name
  def get(f):
    return cached_file(
      path_or_name,
      f,
      _raise_exceptions_for_missing_entries=False,
      _raise_exceptions_for_connection_errors=False,
    )

  return get


def _read_state(get: Callable[[str], Optional[str]], where: str) -> dict:
  """Reads a checkpoint's weights, preferring Flax, then safetensors, then ``.bin`` files.

  Returns ``{"format": "flax", "state": {tuple key: array}}`` for Flax weights, or
  ``{"format": "pt", "state": {"dotted.pytorch.name": array}}`` for PyTorch weights (unconverted).
  """

  def shards(index_name):
    with open(get(index_name)) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    paths = [get(s) for s in files]
    if any(p is None for p in paths):
      raise ValueError(f"{where}: {index_name} names shards that are missing: {files}")
    return paths

  if get(_FLAX) or get(_FLAX_INDEX):
    paths = [get(_FLAX)] if get(_FLAX) else shards(_FLAX_INDEX)
    state = {}
    for p in paths:  # msgpack via flax.serialization: no pickle
      state.update(flatten_dict(FlaxCLIPModel.load_flax_weights(p)))
    return {"format": "flax", "state": state}
  if get(_SAFE) or get(_SAFE_INDEX):
    paths = [get(_SAFE)] if get(_SAFE) else shards(_SAFE_INDEX)
    state, fmt = {}, "pt"
    for p in paths:
      tensors, metadata = read_file(p)  # bf16 survives, as ml_dtypes.bfloat16
      fmt = metadata.get("format", "pt")
      state.update(tensors)
    if fmt == "flax":
      return {"format": "flax", "state": {tuple(k.split(".")): v for k, v in state.items()}}
    return {"format": "pt", "state": state}
  if get(_BIN) or get(_BIN_INDEX):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
        f"{where} has only PyTorch .bin weights; converting them needs torch, which is "
        "not installed (install torch, or provide flax_model.msgpack or model.safetensors)"
      ) from e
    paths = [get(_BIN)] if get(_BIN) else shards(_BIN_INDEX)
    state = {}
    for p in paths:
      sd = torch.load(p, map_location="cpu", weights_only=True)
      state.update(
        {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
      )
    return {"format": "pt", "state": state}
  raise ValueError(
    f"{where} has a CLIP config.json but no weights: expected one of {_FLAX}, {_SAFE}, {_BIN} "
    "(or their sharded .index.json)"
  )


def load_clip(path_or_name: str, dtype: Any = jnp.float32) -> tuple[Any, dict]:
  """Loads a CLIP checkpoint as transformers' Flax CLIP and its parameters.

  Flax weights are read directly; PyTorch weights (safetensors, or ``.bin`` when torch is installed)
  are converted with transformers' PyTorch-to-Flax key mapping. Sharded checkpoints are supported.

  Args:
    path_or_name: a local checkpoint directory or a Hugging Face hub name (e.g.
      ``openai/clip-vit-large-patch14-336``; the cache is used when ``HF_HUB_OFFLINE=1``).
    dtype: computation dtype of the model; floating parameters are cast to it as well.

  Returns:
    ``(model, params)``: a ``FlaxCLIPModel`` (``config.model_type == "clip"``) or a
    ``FlaxCLIPVisionModel`` (``"clip_vision_model"``, e.g. a LLaVA vision tower) created without
    random initialisation, and its parameter tree on the default device.

  Raises:
    ValueError: not a CLIP checkpoint (no config.json, another model_type, missing weights or
      parameters of the wrong shape).
    ImportError: only ``.bin`` weights exist and torch is not installed.
  """
  where = f"CLIP checkpoint {path_or_name!r}"
  get = _file_getter(path_or_name)
  config_file = get("config.json")
  if config_file is None:
    hint = (
      ""
      if os.path.isdir(path_or_name)
      else " (not a local directory, and not in the hub cache or online)"
    )
    raise ValueError(f"{where} is not a CLIP checkpoint: no config.json found{hint}")
  with open(config_file) as f:
    model_type = json.load(f).get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(
      f"{where} is not a CLIP checkpoint: config.json has model_type={model_type!r}, "
      f"expected one of {sorted(_MODEL_TYPES)}"
    )
  config_cls, model_cls = _MODEL_TYPES[model_type]
  config = config_cls.from_json_file(config_file)
  model = model_cls(config, dtype=dtype, _do_init=False)
  expected = flatten_dict(dict(model.params_shape_tree))

  loaded = _read_state(get, where)
  if loaded["format"] == "pt":
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    shim = type(
      "_Shapes",
      (),
      {"params": dict(model.params_shape_tree), "base_model_prefix": model.base_model_prefix},
    )()
    state = flatten_dict(convert_pytorch_state_dict_to_flax(loaded["state"], shim))
  else:
    state = loaded["state"]
  missing = sorted(".".join(k) for k in expected if k not in state)
  if missing:
    raise ValueError(
      f"{where}: {len(missing)} parameters missing from the weights, e.g. {missing[:5]}"
    )
  params = {}
  for key, spec in expected.items():
    value = state[key]
    if tuple(value.shape) != tuple(spec.shape):
      raise ValueError(
        f"{where}: parameter {'.'.join(key)} has shape {tuple(value.shape)}, "
        f"config expects {tuple(spec.shape)}"
      )
    value = jnp.asarray(value)
    params[key] = value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value
  return model, unflatten_dict(params)


def preprocess(images_uint8, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
  """CLIP's image preprocessing in pure JAX (jittable; shapes are static).

  Shortest side resized to ``image_size`` (bicubic with antialiasing, long side
  ``int(image_size * long / short)`` as in ``CLIPImageProcessor``), centre crop to
  ``image_size x image_size``, scale to [0, 1], normalise per channel. A 32x32 CIFAR image is
  upsampled by the same path. When the input is already ``image_size`` on its short side no resize
  happens and the result equals ``CLIPImageProcessor``'s exactly. Otherwise the resize follows PIL's
  (separable, width pass then height pass, each rounded and clipped to uint8 levels) but is not
  bit-identical: PIL computes in fixed point, so about one value in a hundred differs by one uint8
  level (rarely two), i.e. by ~0.015 after normalisation.

  Args:
    images_uint8: ``[N, H, W, C]`` or ``[H, W, C]`` pixel values in [0, 255] (uint8 or float);
      ``C`` is 3, or 1 (grey, repeated to RGB).
    image_size: output height and width.
    mean: per-channel mean (CLIP's by default).
    std: per-channel standard deviation (CLIP's by default).

  Returns:
    float32 ``[N, image_size, image_size, 3]`` (NHWC, as the Flax CLIP module takes it).
  """
  x = jnp.asarray(images_uint8)
  if x.ndim == 3:
    x = x[None]
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = x.astype(jnp.float32)
  n, h, w, c = x.shape
  if h <= w:
    nh, nw = image_size, int(image_size * w / h)
  else:
    nh, nw = int(image_size * h / w), image_size
  if (nh, nw) != (h, w):
    # Separable, width pass then height pass, rounding to uint8 levels after each: PIL's order.
    for shape in ((n, h, nw, c), (n, nh, nw, c)):
      if shape != x.shape:
        x = jax.image.resize(x, shape, method="bicubic", antialias=True)
        x = jnp.clip(jnp.round(x), 0.0, 255.0)
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  x = x[:, top : top + image_size, left : left + image_size]
  return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def grid_features(model, params, pixel_values, layer: int = -2) -> jax.Array:
  """Patch features of one vision-encoder layer, CLS token dropped (LLaVA's ``mm_vision_select``).

  Runs only the vision tower. LLaVA-1.5 (Liu et al., 2023) uses ``layer=-2``, the second-to-last
  entry of ``hidden_states`` (whose entry 0 is the embedding output after ``pre_layrnorm``).

  Args:
    model: a ``FlaxCLIPModel`` or ``FlaxCLIPVisionModel``.
    params: its parameters.
    pixel_values: ``[N, H, W, 3]`` preprocessed images (NHWC, see ``preprocess``).
    layer: index into ``hidden_states``.

  Returns:
    ``[N, num_patches, vision_width]`` in the model's dtype.
  """

  def fn(module, x):
    out = module.vision_model(
      pixel_values=x, deterministic=True, output_hidden_states=True, return_dict=True
    )
    return out.hidden_states[layer][:, 1:]

  return model.module.apply({"params": params}, pixel_values, method=fn)


def image_features(model, params, pixel_values) -> jax.Array:
  """Projected image embeddings (not normalised): ``visual_projection(post_layernorm(CLS))``.

  Args:
    model: a ``FlaxCLIPModel``.
    params: its parameters.
    pixel_values: ``[N, H, W, 3]`` preprocessed images.

  Returns:
    ``[N, projection_dim]``.
  """
  _require_full(model)

  def fn(module, x):
    return module.visual_projection(module.vision_model(pixel_values=x, deterministic=True)[1])

  return model.module.apply({"params": params}, pixel_values, method=fn)


def _text_features(model, params, input_ids, attention_mask):
  def fn(module, ids, mask):
    pos = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
    out = module.text_model(
      input_ids=ids, attention_mask=mask, position_ids=pos, deterministic=True
    )
    return module.text_projection(out[1])

  return model.module.apply({"params": params}, input_ids, attention_mask, method=fn)


def _require_full(model):
  if not isinstance(model, FlaxCLIPModel):
    raise ValueError(
      f"zero-shot CLIP needs both towers; got {type(model).__name__} (a vision-only checkpoint)"
    )


def _l2_normalize(x, axis=-1):
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def text_class_embeddings(
  model,
  params,
  tokenizer,
  classnames: Sequence[str],
  templates: Sequence[str],
  batch_size: int = 256,
) -> jax.Array:
  """CLIP's zero-shot classifier: one text embedding per class, averaged over prompt templates.

  Every ``template.format(classname)`` is tokenised (padded to the text tower's context length),
  embedded and L2-normalised; the embeddings of a class are averaged and normalised again
  (Radford et al., 2021, prompt ensembling).

  Args:
    model: a ``FlaxCLIPModel``.
    params: its parameters.
    tokenizer: the checkpoint's CLIP tokenizer.
    classnames: ``C`` readable class names.
    templates: ``T`` prompt templates, each with one ``{}``.
    batch_size: prompts per text-tower call (one compiled shape; the last batch is padded).

  Returns:
    float32 ``[C, projection_dim]``, unit rows.
  """
  _require_full(model)
  if not classnames or not templates:
    raise ValueError("text_class_embeddings needs at least one class name and one template")
  prompts = [t.format(c) for c in classnames for t in templates]
  tok = tokenizer(
    prompts,
    padding="max_length",
    truncation=True,
    max_length=model.config.text_config.max_position_embeddings,
    return_tensors="np",
  )
  ids, mask = tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(np.int32)
  fn = jax.jit(functools.partial(_text_features, model))
  feats = batching.apply_in_batches(lambda i, m: fn(params, i, m), (ids, mask), batch_size)
  feats = _l2_normalize(jnp.asarray(feats, jnp.float32))
  feats = feats.reshape(len(classnames), len(templates), -1).mean(axis=1)
  return _l2_normalize(feats)


def zero_shot_logits(model, params, pixel_values, class_embeddings) -> jax.Array:
  """Zero-shot CLIP logits: ``exp(logit_scale) * cos(image embedding, class embedding)``.

  Args:
    model: a ``FlaxCLIPModel``.
    params: its parameters.
    pixel_values: ``[N, H, W, 3]`` preprocessed images.
    class_embeddings: ``[C, D]`` unit rows from ``text_class_embeddings``.

  Returns:
    float32 ``[N, C]``.
  """
  img = _l2_normalize(image_features(model, params, pixel_values).astype(jnp.float32))
  scale = jnp.exp(params["logit_scale"].astype(jnp.float32))
  return scale * img @ jnp.asarray(class_embeddings, jnp.float32).T


@dataclasses.dataclass(frozen=True, eq=False)
class ClipTeacher:
  """A loaded CLIP with its tokenizer: uint8 images in, zero-shot logits or patch features out.

  Attributes:
    model: ``FlaxCLIPModel`` (or ``FlaxCLIPVisionModel``: grid features only).
    params: its parameters.
    tokenizer: the CLIP tokenizer, or None for a vision-only checkpoint.
    image_size: the vision tower's input size.
  """

  model: Any
  params: Any
  tokenizer: Any
  image_size: int

  @classmethod
  def load(cls, path_or_name: str, dtype: Any = jnp.float32) -> "ClipTeacher":
    """Loads model, parameters and tokenizer (``AutoTokenizer``, no remote code) from one checkpoint."""
    model, params = load_clip(path_or_name, dtype)
    tokenizer = None  # a vision tower alone has no text tower to tokenise for
    if isinstance(model, FlaxCLIPModel):
      tokenizer = AutoTokenizer.from_pretrained(path_or_name, trust_remote_code=False)
    cfg = model.config.vision_config if isinstance(model, FlaxCLIPModel) else model.config
    return cls(model, params, tokenizer, int(cfg.image_size))

  @functools.cached_property
  def _jit_logits(self):
    return jax.jit(
      lambda p, x, e: zero_shot_logits(self.model, p, preprocess(x, self.image_size), e)
    )

  @functools.cached_property
  def _jit_grid(self):
    return jax.jit(
      lambda p, x, layer: grid_features(self.model, p, preprocess(x, self.image_size), layer),
      static_argnums=2,
    )

  def preprocess(self, images_uint8) -> jax.Array:
    """``preprocess`` at this teacher's image size."""
    return preprocess(images_uint8, self.image_size)

  def class_embeddings(
    self, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)
  ):
    """``text_class_embeddings`` with this teacher's model and tokenizer: ``[C, D]``."""
    if self.tokenizer is None:
      raise ValueError("this CLIP teacher has no tokenizer (vision-only checkpoint)")
    return text_class_embeddings(self.model, self.params, self.tokenizer, classnames, templates)

  def zero_shot_logits(
    self, images_uint8, class_embeddings, batch_size: Optional[int] = None
  ) -> jax.Array:
    """Preprocesses raw images and returns float32 zero-shot logits ``[N, C]``.

    Args:
      images_uint8: ``[N, H, W, C]`` pixels in [0, 255].
      class_embeddings: ``[C, D]`` from ``class_embeddings``.
      batch_size: images per call (the last batch is padded, so one shape compiles); all at once
        when None.
    """
    fn = lambda x: self._jit_logits(self.params, x, class_embeddings)  # noqa: E731
    return jnp.asarray(batching.apply_in_batches(fn, (images_uint8,), batch_size))

  def grid_features(
    self, images_uint8, layer: int = -2, batch_size: Optional[int] = None
  ) -> jax.Array:
    """Preprocesses raw images and returns layer ``layer``'s patch features, CLS dropped."""
    fn = lambda x: self._jit_grid(self.params, x, layer)  # noqa: E731
    return jnp.asarray(batching.apply_in_batches(fn, (images_uint8,), batch_size))
