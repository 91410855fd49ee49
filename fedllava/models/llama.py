"""LLaMA decoder in Flax that takes input embeddings, over FlaxLlamaForCausalLM's parameter tree.

transformers' `FlaxLlamaForCausalLM` (4.57) has no `inputs_embeds`, no remat, a RoPE base fixed at
10000 and a Flax "cache" collection that is awkward inside `lax.while_loop`. This module computes
the same function as transformers' PyTorch `LlamaForCausalLM` and keeps Flax's parameter names:

    {"model": {"embed_tokens": {"embedding"}, "layers": {"0": {...}, ...}, "norm": {"weight"}},
     "lm_head": {"kernel"}}

so a tree made for (or by) `FlaxLlamaForCausalLM` is a tree for this module, and vice versa.
Grouped-query attention (num_key_value_heads < num_attention_heads), `rope_theta` and `head_dim`
follow the config. The KV cache is explicit: a tuple of (key, value) arrays per layer of shape
[batch, slots, kv_heads, head_dim], written at `cache_index`, so decoding runs in a jitted loop.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Cache = Tuple[Tuple[jax.Array, jax.Array], ...]
MASK_VALUE = float(np.finfo(np.float32).min)


def head_dim_of(config) -> int:
  return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
  """cos/sin tables as transformers' LlamaRotaryEmbedding ('default' rope), shape [B, T, 1, D]."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim))
  freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb)[:, :, None, :].astype(dtype), jnp.sin(emb)[:, :, None, :].astype(dtype)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def attention_bias(key_mask, query_len: int, offset=0):
  """Additive bias [B, 1, 1, Tq, S]: query i (at slot offset+i) sees slot j if j <= offset+i and key_mask[b, j]."""
  slots = key_mask.shape[1]
  q = offset + jnp.arange(query_len)[:, None]
  allowed = (jnp.arange(slots)[None, :] <= q)[None] & (key_mask[:, None, :] > 0)
  return jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)[:, None, None]


class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 / jnp.sqrt(var + self.eps)).astype(self.dtype)
    return w.astype(self.dtype) * y


class LlamaAttention(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, bias, kv_cache=None, cache_index=None):
    cfg = self.config
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg)
    init = nn.initializers.normal(cfg.initializer_range)

    def dense(n, name):
      return nn.Dense(n, use_bias=cfg.attention_bias, dtype=self.dtype, kernel_init=init, name=name)

    q = dense(nh * hd, "q_proj")(x).reshape(b, t, nh, hd)
    k = dense(nkv * hd, "k_proj")(x).reshape(b, t, nkv, hd)
    v = dense(nkv * hd, "v_proj")(x).reshape(b, t, nkv, hd)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    new_cache = None
    if kv_cache is not None:
      ck, cv = kv_cache
      idx = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), idx)
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), idx)
      new_cache = (k, v)
    qg = q.reshape(b, t, nkv, nh // nkv, hd)  # head h = kv * groups + g, as PyTorch's repeat_kv
    scores = jnp.einsum(
      "btkgd,bskd->bkgts", qg, k.astype(self.dtype), preferred_element_type=jnp.float32
    ) * (hd**-0.5)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype)).reshape(b, t, nh * hd)
    o = nn.Dense(
      cfg.hidden_size,
      use_bias=cfg.attention_bias,
      dtype=self.dtype,
      kernel_init=init,
      name="o_proj",
    )(out)
    return o, new_cache


class LlamaMLP(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    bias = bool(getattr(cfg, "mlp_bias", False))
    if cfg.hidden_act != "silu":
      raise NotImplementedError(f"LLaMA hidden_act {cfg.hidden_act!r}: only 'silu' is supported")
    gate = nn.Dense(
      cfg.intermediate_size, use_bias=bias, dtype=self.dtype, kernel_init=init, name="gate_proj"
    )(x)
    up = nn.Dense(
      cfg.intermediate_size, use_bias=bias, dtype=self.dtype, kernel_init=init, name="up_proj"
    )(x)
    return nn.Dense(
      cfg.hidden_size, use_bias=bias, dtype=self.dtype, kernel_init=init, name="down_proj"
    )(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, bias, kv_cache=None, cache_index=None):
    eps = self.config.rms_norm_eps
    h, new_cache = LlamaAttention(self.config, self.dtype, name="self_attn")(
      RMSNorm(eps, self.dtype, name="input_layernorm")(x), cos, sin, bias, kv_cache, cache_index
    )
    x = x + h
    x = x + LlamaMLP(self.config, self.dtype, name="mlp")(
      RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
    )
    return x, new_cache


class LlamaLayers(nn.Module):
  """The decoder stack; children named "0", "1", ... as in FlaxLlamaLayerCollection."""

  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, cos, sin, bias, caches: Optional[Cache] = None, cache_index=None):
    layer_cls = nn.remat(LlamaDecoderLayer) if self.remat else LlamaDecoderLayer
    new_caches = []
    for i in range(self.config.num_hidden_layers):
      kv = None if caches is None else caches[i]
      x, c = layer_cls(self.config, self.dtype, name=str(i))(x, cos, sin, bias, kv, cache_index)
      new_caches.append(c)
    return x, (None if caches is None else tuple(new_caches))


class LlamaModel(nn.Module):
  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=self.dtype,
      embedding_init=nn.initializers.normal(cfg.initializer_range),
    )
    self.layers = LlamaLayers(cfg, self.dtype, self.remat)
    self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

  def embed(self, input_ids):
    return self.embed_tokens(input_ids.astype(jnp.int32))

  def __call__(self, inputs_embeds, key_mask, position_ids, caches=None, cache_index=None):
    cfg = self.config
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
      raise NotImplementedError(f"rope_scaling {scaling!r} is not supported (only default RoPE)")
    cos, sin = rope_cos_sin(
      position_ids, head_dim_of(cfg), float(getattr(cfg, "rope_theta", 10000.0)), self.dtype
    )
    offset = 0 if cache_index is None else cache_index
    bias = attention_bias(key_mask, inputs_embeds.shape[1], offset)
    x, new_caches = self.layers(
      inputs_embeds.astype(self.dtype), cos, sin, bias, caches, cache_index
    )
    return self.norm(x), new_caches


class LlamaForCausalLM(nn.Module):
  """Methods: `embed(ids)`, `hidden(embeds, key_mask, position_ids, caches, cache_index)`,
  `logits(hidden)`, and `__call__(embeds, attention_mask, position_ids)` -> logits."""

  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    self.model = LlamaModel(self.config, self.dtype, self.remat)
    if not getattr(self.config, "tie_word_embeddings", False):
      self.lm_head = nn.Dense(
        self.config.vocab_size,
        use_bias=False,
        dtype=self.dtype,
        kernel_init=nn.initializers.normal(self.config.initializer_range),
      )

  def embed(self, input_ids):
    return self.model.embed(input_ids)

  def hidden(self, inputs_embeds, key_mask, position_ids, caches=None, cache_index=None):
    return self.model(inputs_embeds, key_mask, position_ids, caches, cache_index)

  def logits(self, hidden):
    if getattr(self.config, "tie_word_embeddings", False):
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, inputs_embeds, attention_mask, position_ids):
    h, _ = self.hidden(inputs_embeds, attention_mask, position_ids)
    return self.logits(h)

  def from_ids(self, input_ids, attention_mask, position_ids):
    """Logits from token ids (as FlaxLlamaForCausalLM); also what `init` should call."""
    return self(self.embed(input_ids), attention_mask, position_ids)


def positions_from_mask(attention_mask):
  """Position ids as transformers' generate makes them: cumsum(mask) - 1, and 1 at padding."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 1)


def init_cache(config, batch: int, slots: int, dtype) -> Cache:
  shape = (batch, slots, config.num_key_value_heads, head_dim_of(config))
  return tuple(
    (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)
  )
