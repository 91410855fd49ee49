"""Dynamic Weighted Pretraining (DWP): the FL model learns to stand in for LLaVA's CLIP (Eq. 2).

The paper (section 3.1, Eq. 2) blends the teacher's visual features with the FL model's,

    Z = (1 - a(t)) g(x) + a(t) g_fl(x),    loss = next-token CE of LLM(W(Z), caption),

with g the frozen CLIP vision tower, W the frozen projector and the LLM frozen; only g_fl (the FL
backbone and its feature MLP) is trained. a(t) rises from 0 to 1 on a half cosine over the first
half of training (section 4.1: 2 of 4 epochs) and then stays at 1, where g(x) has weight zero and is
not computed at all.

Shapes and choices (DESIGN.md, "Stage 1"):
  * g(x) = ``LlavaModel.image_features`` on the CLIP-resolution image: hidden_states[-2] without
    CLS, [B, N, D_v] (LLaVA-1.5: 576 x 1024, a 24 x 24 patch grid in row-major order).
  * g_fl(x) = the ResNet's ``tokens`` on the image at the FL model's own resolution (32 px for
    CIFAR: an 8 x 8 map), i.e. ``FeatureMLP(feature_map)``, then resized to CLIP's grid with
    ``jax.image.resize(..., "bilinear")`` (half-pixel centres; antialiased when shrinking). Order
    MLP -> resize: the MLP is exactly the ResNet's own ``feature_mlp`` on its own map, so stage 2
    reuses backbone + MLP unchanged (``head_on_mlp`` pools these same tokens); the resize is linear
    and parameter-free, and the MLP runs on 64 positions instead of 576 (9x fewer FLOPs).
  * The caller gives both images (``images_clip`` for CLIP, ``images_fl`` for g_fl); resizing one
    image into the other's resolution is the loader's business, not the step's.
  * BN in train mode with running-statistics updates (PyTorch semantics, masked by ``valid``): g_fl
    starts untrained, so its running statistics mean nothing yet; stage 2 trains in train mode too
    (CReFF) and needs running statistics that belong to the pretrained weights it receives.
  * Loss: sum of token NLLs over the whole batch / its number of target tokens, so accumulating
    ``accum_steps`` micro-batches gives the gradient of the full batch (up to BN, whose statistics
    are per micro-batch, as in PyTorch accumulation; running statistics are the valid-count-weighted
    mean of the micro-batches' updates).

Batch (fixed shapes, leading dim B divisible by ``accum_steps``):
  ``images_clip`` [B, 3, H_c, W_c] (NCHW as HF processors give; NHWC with ``clip_channels_last``;
  may be absent once a == 1), ``images_fl`` [B, h, w, C] NHWC, ``input_ids`` [B, T] with N
  ``<image>`` tokens per row, ``labels`` [B, T] (-100 = not in the loss), ``attention_mask``
  [B, T], ``valid`` [B] (0 = padding row: out of the loss and of BN statistics).

References: the paper's Eq. 2 and section 4.1; Liu et al. 2023 (LLaVA-1.5) for g and the loss.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fedllava.models.llava import LlavaModel, next_token_loss
from fedllava.sharding import MODEL, fsdp_shardings

FROZEN_FL_PARTS = ("classifier",)  # ResNet params not in g_fl: no gradient, no optimizer state


# ---- the a(t) schedule ----
def alpha_value(step: int, ramp_steps: int) -> float:
  """a(t) = 0.5 (1 - cos(pi t / T_ramp)) for t < T_ramp, else 1 (Sec. 3.1; DESIGN.md, stage 1).

  A Python float computed on the host: it is a step's argument, and a = 1 picks the compiled
  step variant that skips CLIP (its weight is zero).
  """
  if step >= ramp_steps:
    return 1.0
  return 0.5 * (1.0 - math.cos(math.pi * step / ramp_steps))


# ---- g_fl and the blend ----
def split_trainable(params):
  """(g_fl's params: backbone + feature MLP, the rest: the classifier head)."""
  train = {k: v for k, v in params.items() if k not in FROZEN_FL_PARTS}
  return train, {k: v for k, v in params.items() if k in FROZEN_FL_PARTS}


def clip_grid(llava: LlavaModel) -> tuple[int, int]:
  vc = llava.config.vision_config
  side = vc.image_size // vc.patch_size
  return side, side


def fl_tokens(fl_model, params, batch_stats, images_fl, grid, mask=None, train=True):
  """g_fl(x): [B, gh * gw, D] tokens on CLIP's grid, and the updated batch statistics.

  The ResNet's ``tokens`` (feature MLP on its last map, [B, h * w, D]) are bilinearly resized from
  h x w to ``grid`` in float32 (skipped when the grids already agree).
  """
  variables = {"params": params, "batch_stats": batch_stats}
  if train:
    out, new = fl_model.apply(variables, images_fl, True, mask, mutable=["batch_stats"])
    new_stats = new["batch_stats"]
  else:
    out, new_stats = fl_model.apply(variables, images_fl, False), batch_stats
  b, h, w = out["feature_map"].shape[:3]
  tok = out["tokens"].astype(jnp.float32).reshape(b, h, w, -1)
  if (h, w) != tuple(grid):
    tok = jax.image.resize(tok, (b, *grid, tok.shape[-1]), "bilinear")
  return tok.reshape(b, grid[0] * grid[1], -1), new_stats


def blend(g, g_fl, alpha):
  """Eq. 2 in float32: (1 - a) g + a g_fl."""
  return (1.0 - alpha) * g.astype(jnp.float32) + alpha * g_fl.astype(jnp.float32)


# ---- loss and gradients ----
def _num_targets(labels):
  return jnp.sum(labels[:, 1:] != -100)


def dwp_loss_and_grads(
  llava: LlavaModel,
  fl_model,
  params,
  batch_stats,
  teacher_params,
  batch,
  alpha,
  *,
  use_clip: bool = True,
  accum_steps: int = 1,
  clip_channels_last: bool = False,
):
  """Loss, gradient w.r.t. g_fl and new BN statistics of one DWP step (pure; jit it).

  Args:
    llava: the frozen teacher; ``teacher_params`` its parameter tree (any float dtype).
    fl_model: a ``ResNet`` with ``mlp_dim == llava.feature_dim``; ``params``/``batch_stats`` its
      variables (the classifier gets no gradient).
    batch: see the module docstring. alpha: a in Eq. 2 (ignored when ``use_clip`` is False,
      which means a == 1 and CLIP is never called).
    accum_steps: micro-batches scanned in sequence; the loss is normalised by the whole batch's
      target-token count, so the summed gradient is the full batch's.

  Returns:
    (loss, grads, new_batch_stats, num_targets); grads has the tree of
    ``split_trainable(params)[0]``.
  """
  trainable, rest = split_trainable(params)
  grid = clip_grid(llava)
  valid = batch["valid"].astype(bool)
  labels = jnp.where(valid[:, None], batch["labels"], -100)
  total = _num_targets(labels)
  denom = jnp.maximum(total, 1).astype(jnp.float32)
  data = {k: v for k, v in batch.items() if k != "labels"} | {"labels": labels}
  if not use_clip:
    data.pop("images_clip", None)

  def micro(mb):
    g = None
    if use_clip:  # frozen: computed outside the differentiated function
      g = llava.image_features(teacher_params, mb["images_clip"], clip_channels_last)

    def loss_fn(tp):
      z, stats = fl_tokens(fl_model, tp | rest, batch_stats, mb["images_fl"], grid, mb["valid"])
      if use_clip:
        z = blend(g, z, alpha)
      logits = llava.forward_from_features(teacher_params, z, mb["input_ids"], mb["attention_mask"])
      nll_sum = next_token_loss(logits, mb["labels"]) * _num_targets(mb["labels"])
      return nll_sum / denom, stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return loss, grads, stats

  if accum_steps == 1:
    loss, grads, new_stats = micro(data)
  else:
    b = batch["valid"].shape[0]
    if b % accum_steps:
      raise ValueError(f"batch size {b} is not divisible by accum_steps={accum_steps}")
    stacked = jax.tree.map(lambda x: x.reshape(accum_steps, b // accum_steps, *x.shape[1:]), data)

    def body(carry, mb):
      loss_acc, grad_acc, stats_acc, w_acc = carry
      loss, grads, stats = micro(mb)
      w = jnp.sum(mb["valid"]).astype(jnp.float32)
      stats_acc = jax.tree.map(lambda a, s: a + w * s, stats_acc, stats)
      grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
      return (loss_acc + loss, grad_acc, stats_acc, w_acc + w), None

    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    init = (jnp.float32(0), zeros(trainable), zeros(batch_stats), jnp.float32(0))
    (loss, grads, stats_sum, w), _ = jax.lax.scan(body, init, stacked)
    new_stats = jax.tree.map(
      lambda s, old: jnp.where(w > 0, s / jnp.maximum(w, 1.0), old), stats_sum, batch_stats
    )
  return loss, grads, new_stats, total


# ---- state and the jitted step ----
class DWPState(flax.struct.PyTreeNode):
  """step, the FL model's full ``params`` (classifier included, untouched), BN statistics, and
  the optimizer state of g_fl's params only."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_dwp_state(variables, tx: optax.GradientTransformation) -> DWPState:
  """State from the FL model's Flax variables (``{"params", "batch_stats"}``), copied: the step
  donates its state, and the caller's arrays must survive that."""
  own = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), flax.core.unfreeze(t))
  params = own(variables["params"])
  return DWPState(
    jnp.int32(0), params, own(variables["batch_stats"]), tx.init(split_trainable(params)[0])
  )


def create_optimizer(
  learning_rate: float, total_steps: int, warmup_ratio: float = 0.03, weight_decay: float = 0.0
) -> optax.GradientTransformation:
  """LLaVA's pretraining recipe: AdamW, linear warm-up over ``warmup_ratio``, cosine decay to 0
  (the paper: lr 2e-3, batch 128)."""
  warmup = max(int(round(warmup_ratio * total_steps)), 0)
  sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(total_steps, 1))
  return optax.adamw(sched, weight_decay=weight_decay)


class DWPStep:
  """The jitted DWP step in two compiled variants, chosen on the host by a:

  ``with_clip(state, teacher_params, batch, alpha)`` for a < 1 (computes g(x)) and
  ``without_clip(state, teacher_params, batch)`` for a == 1 (Z = g_fl(x); CLIP is not in the
  program). Both donate only ``state``; the frozen teacher is never donated. A batch with no target
  token changes nothing (params, optimizer, BN statistics, step).

  Call ``step(state, teacher_params, batch, alpha)`` with ``alpha = alpha_value(t, ramp)``;
  returns ``(state, metrics)`` with metrics ``loss``, ``alpha``, ``num_targets``, ``grad_norm``.
  """

  def __init__(
    self,
    llava: LlavaModel,
    fl_model,
    tx: optax.GradientTransformation,
    accum_steps: int = 1,
    clip_channels_last: bool = False,
  ):
    if llava.strategy != "default":
      raise ValueError(
        "DWP blends CLIP's patch grid: vision_feature_select_strategy must be "
        f"'default' (CLS dropped), got {llava.strategy!r}"
      )
    if fl_model.mlp_dim != llava.feature_dim:
      raise ValueError(
        f"the FL model's mlp_dim ({fl_model.mlp_dim}) must equal CLIP's feature "
        f"width ({llava.feature_dim}); set config.model.mlp_dim"
      )
    if accum_steps < 1:
      raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    self.llava, self.fl_model, self.tx = llava, fl_model, tx
    self.accum_steps, self.clip_channels_last = int(accum_steps), clip_channels_last
    self.with_clip = jax.jit(lambda s, t, b, a: self._step(s, t, b, a, True), donate_argnums=0)
    self.without_clip = jax.jit(
      lambda s, t, b: self._step(s, t, b, jnp.float32(1), False), donate_argnums=0
    )

  def __call__(self, state, teacher_params, batch, alpha: float):
    if alpha >= 1.0:
      batch = {k: v for k, v in batch.items() if k != "images_clip"}
      return self.without_clip(state, teacher_params, batch)
    return self.with_clip(state, teacher_params, batch, jnp.float32(alpha))

  def _step(self, state, teacher_params, batch, alpha, use_clip):
    loss, grads, stats, total = dwp_loss_and_grads(
      self.llava,
      self.fl_model,
      state.params,
      state.batch_stats,
      teacher_params,
      batch,
      alpha,
      use_clip=use_clip,
      accum_steps=self.accum_steps,
      clip_channels_last=self.clip_channels_last,
    )
    trainable, rest = split_trainable(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
    new = DWPState(state.step + 1, optax.apply_updates(trainable, updates) | rest, stats, opt_state)
    new = jax.tree.map(lambda n, o: jnp.where(total > 0, n, o), new, state)
    metrics = {
      "loss": loss,
      "alpha": alpha,
      "num_targets": total,
      "grad_norm": optax.global_norm(grads),
    }
    return new, metrics


# ---- FLOPs and MFU ----
def _kernel_params(tree, skip=()) -> int:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return int(
    sum(
      math.prod(x.shape)
      for p, x in flat
      if str(getattr(p[-1], "key", "")) == "kernel"
      and not any(str(getattr(k, "key", "")) in skip for k in p)
    )
  )


def fl_forward_flops(fl_model, variables, image_shape) -> int:
  """Analytic forward FLOPs of g_fl per image: 2 x output positions x kernel size for every conv
  and dense layer (backbone + feature MLP; the unused classifier excluded)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  _, state = jax.eval_shape(
    lambda v, x: fl_model.apply(v, x, False, capture_intermediates=True, mutable=["intermediates"]),
    variables,
    x,
  )
  inter = state["intermediates"]
  total = 0
  for path, k in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    keys = [str(getattr(p, "key", p)) for p in path]
    if keys[-1] != "kernel" or keys[0] in FROZEN_FL_PARTS:
      continue
    node = inter
    for name in keys[:-1]:
      node = node[name]
    out = node["__call__"][0]
    total += 2 * math.prod(out.shape[:-1]) * math.prod(k.shape)
  return int(total)


def dwp_step_flops(
  llava: LlavaModel, batch_size: int, seq_len: int, fl_flops_per_image: int, use_clip: bool
) -> dict:
  """Model FLOPs of one DWP step (a dict; ``total`` is what MFU counts).

  With P the matmul parameters on a path and T tokens: LLM + projector 4 P T (forward 2 P T +
  gradient w.r.t. activations only 2 P T: the frozen weights' dW is never formed; remat's
  recomputation not counted); CLIP forward 2 P_run T_v over the layers actually run, only when
  a < 1; g_fl 3 x its forward (forward, dX, dW). Attention scores (4 L S^2 d per sequence
  forward, 3x that for forward + input gradient) are reported apart, as in
  benchmarks/teacher_step.py.
  """
  shapes = llava.param_shapes()
  vc, tc = llava.config.vision_config, llava.config.text_config
  p_llm = _kernel_params(shapes["language_model"]) + _kernel_params(shapes["multi_modal_projector"])
  n_run = max(llava.feature_layers)  # encoder layers computed (hidden_states[i] = after layer i)
  skip = tuple(str(i) for i in range(n_run, vc.num_hidden_layers))
  p_clip = _kernel_params(shapes["vision_tower"], skip)
  t_llm, s_v = batch_size * seq_len, llava.num_image_tokens + 1
  out = {
    "llm": 4 * p_llm * t_llm,
    "clip": 2 * p_clip * batch_size * s_v if use_clip else 0,
    "fl": 3 * fl_flops_per_image * batch_size,
  }
  out["total"] = sum(out.values())
  out["attention"] = 3 * 4 * tc.num_hidden_layers * seq_len**2 * tc.hidden_size * batch_size + (
    4 * n_run * s_v**2 * vc.hidden_size * batch_size if use_clip else 0
  )
  return out


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
  """Model FLOPs utilisation: flops / (seconds * peak_flops); peak is the caller's (e.g. H100 SXM
  dense bf16 989e12)."""
  return float(flops) / (float(seconds) * float(peak_flops))


# ---- placing the frozen teacher ----
def shard_teacher(teacher_params, mesh, dtype=jnp.bfloat16, axis_name: str = MODEL):
  """Frozen teacher weights cast to ``dtype`` and FSDP-sharded over ``axis_name`` of ``mesh``."""
  cast = jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, teacher_params
  )
  return jax.device_put(cast, fsdp_shardings(cast, mesh, axis_name))
