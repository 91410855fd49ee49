"""The CLIP teacher's model functions: transformers' Flax CLIP (loaded by ``clip_loading.py``).

Two uses in this project:
  * stage 3 (global alignment): zero-shot logits ``q`` from class-name prompts (Radford et al., 2021,
    "Learning Transferable Visual Models From Natural Language Supervision");
  * the LLaVA-1.5 vision tower: the patch grid of the second-to-last layer, CLS dropped (Liu et al.,
    2023, "Improved Baselines with Visual Instruction Tuning").

Images are NHWC throughout: ``preprocess`` returns what the Flax CLIP *module* takes (the
``FlaxCLIPModel.__call__`` wrapper would take NCHW and transpose it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer, FlaxCLIPModel

from fedllava import batching
from fedllava.models.clip_loading import load_clip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
