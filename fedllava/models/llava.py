"""LLaVA-1.5 in Flax: CLIP vision tower -> mlp2x_gelu projector -> LLaMA, as transformers' PyTorch
`LlavaForConditionalGeneration` (4.57) computes it.

Parameter tree (what `fedllava.models.convert.load_llava` returns):
    {"vision_tower": {"vision_model": ...},                 # FlaxCLIPVisionModule's tree
     "multi_modal_projector": {"linear_1": ..., "linear_2": ...},
     "language_model": {"model": ..., "lm_head": ...}}     # FlaxLlamaForCausalLM's tree

Images follow llava-hf: the ids hold one `<image>` token (config.image_token_index) per image
feature, i.e. N = 576 copies per image for LLaVA-1.5 at 336 px, and the projected features replace
those positions in row-major (batch, sequence) order, like PyTorch's `masked_scatter`.

Stage 1 (Dynamic Weighted Pretraining) blends features *before* the projector:
    Z = (1 - a) * model.image_features(params, x) + a * g_fl(x)
    logits = model.forward_from_features(params, Z, input_ids, attention_mask)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedllava.models import llama as llama_lib

try:
  _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover - newer jax moved it
  from jax._src.core import Tracer as _Tracer


def _is_concrete(x) -> bool:
  return not isinstance(x, _Tracer)


class Projector(nn.Module):
  """LLaVA's mlp2x_gelu: linear_1 -> GELU (exact by default) -> linear_2."""

  hidden_size: int
  use_bias: bool = True
  act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    from transformers.modeling_flax_utils import ACT2FN

    x = nn.Dense(self.hidden_size, use_bias=self.use_bias, dtype=self.dtype, name="linear_1")(x)
    x = ACT2FN[self.act](x)
    return nn.Dense(self.hidden_size, use_bias=self.use_bias, dtype=self.dtype, name="linear_2")(x)


def next_token_loss(logits, labels, ignore_index: int = -100):
  """LLaVA's loss: logits[:, t] predicts labels[:, t + 1]; mean cross-entropy over non-ignored targets."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  valid = targets != ignore_index
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _sample(logits, rng, temperature: float, top_p: float):
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:  # as transformers' TopPLogitsWarper: keep the smallest prefix with mass >= top_p
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    before = cum - jax.nn.softmax(sorted_logits, axis=-1)  # mass strictly above each token
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class LlavaModel:
  """Functional LLaVA: every method takes `params` explicitly and is jit/grad friendly."""

  def __init__(self, config, dtype=jnp.bfloat16, remat: bool = False):
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionModule

    self.config = config
    self.dtype = dtype
    self.remat = remat
    self.image_token_index = int(config.image_token_index)
    self.strategy = config.vision_feature_select_strategy
    if self.strategy not in ("default", "full"):
      raise ValueError(
        f"vision_feature_select_strategy must be 'default' or 'full', got {self.strategy!r}"
      )
    vc = config.vision_config
    layers = config.vision_feature_layer
    self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
    n_states = vc.num_hidden_layers + 1  # hidden_states = embeddings + one per layer
    self.feature_layers = [i % n_states for i in self.feature_layers]
    # Only run the CLIP layers the features need (LLaVA-1.5 skips the last one); extra params are ignored.
    run = vc.__class__.from_dict(
      {**vc.to_dict(), "num_hidden_layers": max(max(self.feature_layers), 1)}
    )
    self.vision_full = FlaxCLIPVisionModule(vc, dtype=dtype)
    self.vision = FlaxCLIPVisionModule(run, dtype=dtype)
    self.projector = Projector(
      config.text_config.hidden_size,
      bool(getattr(config, "multimodal_projector_bias", True)),
      config.projector_hidden_act,
      dtype,
    )
    self.llm = llama_lib.LlamaForCausalLM(config.text_config, dtype, remat)
    patches = (vc.image_size // vc.patch_size) ** 2
    self.num_image_tokens = patches + (1 if self.strategy == "full" else 0)
    self.feature_dim = vc.hidden_size * len(self.feature_layers)

  # ---- parameters ----
  def init_params(self, rng):
    """Random float32 parameters (tests, tiny models)."""
    return self._init_jit(rng)

  @functools.partial(jax.jit, static_argnums=0)
  def _init_jit(self, rng):
    vc = self.config.vision_config
    r1, r2, r3 = jax.random.split(rng, 3)
    pix = jnp.zeros((1, vc.image_size, vc.image_size, vc.num_channels), jnp.float32)
    ids = jnp.zeros((1, 2), jnp.int32)
    return {
      "vision_tower": self.vision_full.init(r1, pix)["params"],
      "multi_modal_projector": self.projector.init(r2, jnp.zeros((1, 1, self.feature_dim)))[
        "params"
      ],
      "language_model": self.llm.init(r3, ids, jnp.ones_like(ids), ids, method=self.llm.from_ids)[
        "params"
      ],
    }

  def param_shapes(self):
    """Tree of jax.ShapeDtypeStruct (float32) without allocating anything."""
    return jax.eval_shape(self._init_jit, jax.random.PRNGKey(0))

  def random_params(self, rng, dtype=jnp.bfloat16, shardings=None):
    """Random weights made directly on device in `dtype` (no host init): N(0, 0.02) for matrices,
    ones for norm scales, zeros for biases. `shardings`: optional tree of shardings for the output."""
    shapes = self.param_shapes()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    def make(key):
      keys = jax.random.split(key, len(leaves))
      out = []
      for k, (path, s) in zip(keys, leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "weight"):
          out.append(jnp.ones(s.shape, dtype))
        elif name == "bias":
          out.append(jnp.zeros(s.shape, dtype))
        else:
          out.append((0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype))
      return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(make, out_shardings=shardings)(rng)

  # ---- model pieces ----
  @functools.partial(jax.jit, static_argnums=(0, 3))
  def image_features(self, params, pixel_values, channels_last: bool = False):
    """g(x): CLIP features [num_images, N, D_v] (hidden_states[vision_feature_layer], CLS dropped
    for strategy 'default'). pixel_values are NCHW as HF processors give them (NHWC if channels_last)."""
    x = pixel_values if channels_last else jnp.transpose(pixel_values, (0, 2, 3, 1))
    out = self.vision.apply(
      {"params": params["vision_tower"]}, x.astype(self.dtype), output_hidden_states=True
    )
    states = [out.hidden_states[i] for i in self.feature_layers]
    if self.strategy == "default":
      states = [s[:, 1:] for s in states]
    return jnp.concatenate(states, axis=-1) if len(states) > 1 else states[0]

  def project(self, params, visual_features):
    return self.projector.apply(
      {"params": params["multi_modal_projector"]}, visual_features.astype(self.dtype)
    )

  def check_image_tokens(self, input_ids, visual_features):
    """Raise if the ids' <image> token count != images x tokens per image (host-side check)."""
    n_tok = int(np.sum(np.asarray(input_ids) == self.image_token_index))
    n_img, n_per = int(visual_features.shape[0]), int(visual_features.shape[1])
    if n_tok != n_img * n_per:
      raise ValueError(
        f"input_ids hold {n_tok} <image> tokens (id {self.image_token_index}) but the images give "
        f"{n_img * n_per} features ({n_img} images x {n_per} tokens each); llava-hf expands each "
        f"<image> into {n_per} image tokens"
      )

  def embed_inputs(self, params, visual_features, input_ids):
    """Text embeddings with the projected visual features spliced in at the <image> positions."""
    if _is_concrete(input_ids) and _is_concrete(visual_features):
      self.check_image_tokens(input_ids, visual_features)
    lm = params["language_model"]
    is_img = input_ids == self.image_token_index
    safe_ids = jnp.where(is_img, 0, input_ids)
    text = self.llm.apply({"params": lm}, safe_ids, method=self.llm.embed)
    if visual_features.shape[0] == 0:
      return text
    proj = self.project(params, visual_features)
    flat = proj.reshape(-1, proj.shape[-1]).astype(text.dtype)
    idx = jnp.cumsum(is_img.reshape(-1)) - 1
    gathered = flat[jnp.clip(idx, 0, flat.shape[0] - 1)].reshape(text.shape)
    return jnp.where(is_img[..., None], gathered, text)

  def forward_from_features(
    self, params, visual_features, input_ids, attention_mask, position_ids=None
  ):
    """Logits [B, T, V] from CLIP-space features [num_images, N, D_v] (before the projector).
    position_ids default to cumsum(attention_mask) - 1 (= arange for unpadded rows).
    Checks the <image> token count when called with concrete (non-traced) ids."""
    if _is_concrete(input_ids) and _is_concrete(visual_features):
      self.check_image_tokens(input_ids, visual_features)
    return self._forward_jit(params, visual_features, input_ids, attention_mask, position_ids)

  @functools.partial(jax.jit, static_argnums=0)
  def _forward_jit(self, params, visual_features, input_ids, attention_mask, position_ids):
    embeds = self.embed_inputs(params, visual_features, input_ids)
    if position_ids is None:
      position_ids = llama_lib.positions_from_mask(attention_mask)
    return self.llm.apply(
      {"params": params["language_model"]}, embeds, attention_mask, position_ids
    )

  def forward(self, params, pixel_values, input_ids, attention_mask, position_ids=None):
    feats = self.image_features(params, pixel_values)
    if _is_concrete(input_ids):
      self.check_image_tokens(input_ids, feats)
    return self._forward_jit(params, feats, input_ids, attention_mask, position_ids)

  # ---- decoding ----
  def generate(
    self,
    params,
    pixel_values,
    input_ids,
    attention_mask,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng=None,
    visual_features=None,
  ):
    """New tokens [B, max_new_tokens] with a KV cache. Prompts are left-padded; a row that emits a
    stop token keeps it and is padded with `pad_token_id` afterwards. temperature 0 = greedy;
    otherwise temperature + nucleus (top_p) sampling with `rng`. Pass `visual_features` instead of
    pixels to decode from already computed (e.g. blended) features."""
    if visual_features is None:
      visual_features = self.image_features(params, pixel_values)
    if _is_concrete(input_ids):
      self.check_image_tokens(input_ids, visual_features)
    if temperature > 0 and rng is None:
      raise ValueError(
        "sampling (temperature > 0) needs a PRNG key: pass rng=jax.random.PRNGKey(...)"
      )
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return self._generate_jit(
      params,
      visual_features,
      jnp.asarray(input_ids, jnp.int32),
      jnp.asarray(attention_mask, jnp.int32),
      rng,
      int(max_new_tokens),
      tuple(int(s) for s in stop_token_ids),
      int(pad_token_id),
      float(temperature),
      float(top_p),
    )

  @functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 10))
  def _generate_jit(
    self, params, feats, input_ids, attention_mask, rng, max_new, stops, pad, temperature, top_p
  ):
    lm, tcfg = params["language_model"], self.config.text_config
    b, t = input_ids.shape
    slots = t + max_new
    key_mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new), jnp.int32)], axis=1)
    caches = llama_lib.init_cache(tcfg, b, slots, self.dtype)
    embeds = self.embed_inputs(params, feats, input_ids)
    pos = llama_lib.positions_from_mask(attention_mask)
    h, caches = self.llm.apply(
      {"params": lm}, embeds, key_mask, pos, caches, 0, method=self.llm.hidden
    )
    logits = self.llm.apply({"params": lm}, h[:, -1], method=self.llm.logits)
    rng, sub = jax.random.split(rng)
    tok = _sample(logits, sub, temperature, top_p)
    stop_arr = jnp.asarray(stops if stops else (-1,), jnp.int32)
    done = jnp.isin(tok, stop_arr)
    out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(tok)
    next_pos = jnp.sum(attention_mask, axis=1).astype(jnp.int32)

    def cond(s):
      i, _, _, done, _, _ = s
      return (i < max_new) & ~jnp.all(done)

    def body(s):
      i, out, caches, done, prev, rng = s
      e = self.llm.apply({"params": lm}, prev[:, None], method=self.llm.embed)
      p = (next_pos + i - 1)[:, None]
      h, caches = self.llm.apply(
        {"params": lm}, e, key_mask, p, caches, t + i - 1, method=self.llm.hidden
      )
      logits = self.llm.apply({"params": lm}, h[:, -1], method=self.llm.logits)
      rng, sub = jax.random.split(rng)
      tok = _sample(logits, sub, temperature, top_p)
      tok = jnp.where(done, pad, tok)
      out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
      return i + 1, out, caches, done | jnp.isin(tok, stop_arr), tok, rng

    _, out, _, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, caches, done, tok, rng))
    return out


# ---- memory ----
def param_bytes(params, dtype=jnp.bfloat16) -> int:
  """Bytes the parameters take at `dtype` (params may be arrays or ShapeDtypeStructs)."""
  item = np.dtype(dtype).itemsize
  return int(sum(math.prod(x.shape) * item for x in jax.tree.leaves(params)))


def memory_estimate(params, dtype=jnp.bfloat16, num_devices: int = 1) -> str:
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  total = param_bytes(params, dtype)
  return (
    f"LLaVA parameters: {n / 1e9:.3f} B = {total / 2**30:.2f} GiB at {np.dtype(dtype).name}"
    + (
      f", ~{total / num_devices / 2**30:.2f} GiB per device over {num_devices} devices"
      if num_devices > 1
      else ""
    )
  )
