"""Checks ``config.pretrain`` (stage 1: annotate, DWP, few-shot) before anything runs.

``main.py`` runs this with every other section's validator before the first file is written
(DESIGN.md, "The stage contract"). The teacher and the data are demanded only when a stage that
needs them is in ``config.stages``.
"""

from __future__ import annotations

import math
import os

from fedllava import errors
from fedllava.data import conversation
from fedllava.models import hub
from fedllava.pretrain import prompts, teacher


def _stages(config) -> list[str]:
  return [s for s in config.stages.split(",") if s]


def validate(config) -> None:
  """Checks ``config.pretrain``; demands teacher and data only when its stages run.

  Raises:
    ValueError: naming the field and the fix.
  """
  p = config.pretrain
  for field in ("batch_size", "accum_steps", "epochs", "max_length", "checkpoint_every"):
    if p[field] < 1:
      raise errors.ConfigError(f"config.pretrain.{field}={p[field]} must be >= 1.")
  if p.checkpoint_keep < 1 or p.max_steps < 0 or p.worker_count < 0 or p.demo_images < 1:
    raise errors.ConfigError(
      "config.pretrain.checkpoint_keep and demo_images must be >= 1, max_steps and "
      "worker_count >= 0."
    )
  if p.batch_size % p.accum_steps:
    raise errors.ConfigError(
      f"config.pretrain.batch_size={p.batch_size} must be divisible by "
      f"config.pretrain.accum_steps={p.accum_steps} (micro-batches of equal size)."
    )
  if not 0 <= p.ramp_epochs <= p.epochs:
    raise errors.ConfigError(
      f"config.pretrain.ramp_epochs={p.ramp_epochs} must be in [0, epochs={p.epochs}] "
      "(paper: alpha ramps over 2 of 4 epochs)."
    )
  if not (p.learning_rate > 0 and math.isfinite(p.learning_rate)):
    raise errors.ConfigError(
      f"config.pretrain.learning_rate={p.learning_rate} must be > 0 (paper: 2e-3)."
    )
  if not 0 <= p.warmup_ratio < 1 or p.weight_decay < 0 or p.peak_tflops < 0:
    raise errors.ConfigError(
      "config.pretrain.warmup_ratio must be in [0, 1); weight_decay and peak_tflops >= 0."
    )
  choices = (
    ("template", tuple(conversation.TEMPLATES)),
    ("teacher_dtype", tuple(teacher.TEACHER_DTYPES)),
    ("bad_examples", ("skip", "fail")),
    ("check_images", ("decode", "open", "none")),
  )
  for field, options in choices:
    if p[field] not in options:
      raise errors.ConfigError(f"config.pretrain.{field}={p[field]!r}; choose one of {options}.")
  a = p.annotate
  try:
    prompts.check_kinds([k for k in a.kinds.split(",") if k])
  except ValueError as e:
    raise errors.ConfigError(f"config.pretrain.annotate.kinds={a.kinds!r}: {e}") from None
  if min(a.batch_size, a.max_new_tokens, a.prompt_len) < 1 or a.temperature < 0:
    raise errors.ConfigError(
      "config.pretrain.annotate.batch_size, max_new_tokens and prompt_len must be >= 1, "
      "temperature >= 0."
    )
  if a.template not in conversation.TEMPLATES:
    raise errors.ConfigError(f"config.pretrain.annotate.template={a.template!r} is unknown.")
  f = p.fewshot
  try:
    fractions = [float(x) for x in f.fractions.split(",") if x]
  except ValueError:
    fractions = []
  if not fractions or not all(0 < x <= 1 for x in fractions):
    raise errors.ConfigError(
      f"config.pretrain.fewshot.fractions={f.fractions!r} must be comma-separated numbers in "
      "(0, 1] (paper: 0.004,0.01,0.02)."
    )
  if f.epochs < 1 or f.batch_size < 1 or not f.learning_rate > 0 or not 0 <= f.momentum < 1:
    raise errors.ConfigError(
      "config.pretrain.fewshot: epochs and batch_size must be >= 1, learning_rate > 0, "
      "momentum in [0, 1)."
    )
  stages = _stages(config)
  if "annotate" not in stages and "pretrain" not in stages:
    return
  if not p.teacher:
    raise errors.ConfigError(
      "stage 'annotate'/'pretrain' needs the LLaVA teacher and config.pretrain.teacher is "
      "empty: set it to a llava-hf checkpoint directory (or hub name, e.g. "
      "llava-hf/llava-1.5-7b-hf), or 'random-tiny' for the offline mechanics check."
    )
  if (
    p.teacher != "random-tiny"
    and teacher.looks_like_path(p.teacher)
    and not os.path.isdir(p.teacher)
  ):
    raise errors.ConfigError(
      f"config.pretrain.teacher={p.teacher!r} is not a directory; point it to a llava-hf "
      "checkpoint (config.json + model.safetensors or its shards)."
    )
  if not p.demo and p.teacher != "random-tiny":
    hub.check_hub_teacher(p.teacher, "config.pretrain.teacher")
  if p.tokenizer and teacher.looks_like_path(p.tokenizer) and not os.path.isdir(p.tokenizer):
    raise errors.ConfigError(f"config.pretrain.tokenizer={p.tokenizer!r} is not a directory.")
  if p.demo and p.teacher != "random-tiny":
    raise errors.ConfigError("config.pretrain.demo=True runs on the tiny random teacher: set "
                     "config.pretrain.teacher='random-tiny'.")  # fmt: skip
  if "annotate" in stages and not p.demo and not os.path.isdir(p.unlabeled_dir or ""):
    raise errors.ConfigError(
      f"stage 'annotate' needs config.pretrain.unlabeled_dir={p.unlabeled_dir!r} to be a "
      "folder of unlabeled images."
    )
  if "pretrain" not in stages:
    return
  if config.model.mlp_dim is None:
    raise errors.ConfigError(
      "stage 'pretrain' blends g_fl's tokens with CLIP's (Eq. 2): set config.model.mlp_dim to "
      "the teacher's CLIP width (1024 for LLaVA-1.5's ViT-L/14-336)."
    )
  # the stage order itself is main's registry's rule (main.check_stage_order)
  if "annotate" not in stages:
    if p.demo:
      raise errors.ConfigError("config.pretrain.demo needs stage 'annotate' before 'pretrain'.")
    if not os.path.isfile(p.data_json or ""):
      raise errors.ConfigError(
        f"stage 'pretrain' without 'annotate' reads config.pretrain.data_json="
        f"{p.data_json!r}, which is not a file (LLaVA format, e.g. blip_laion_cc_sbu_558k.json)."
      )
    if not os.path.isdir(p.image_dir or ""):
      raise errors.ConfigError(
        f"config.pretrain.image_dir={p.image_dir!r} is not a folder (the images that "
        "config.pretrain.data_json's 'image' paths are relative to)."
      )
