"""Stage 1's LLaVA teacher: where its checkpoint is, and loading it (annotate and DWP share this).

``config.pretrain.teacher`` names a llava-hf checkpoint directory, a Hugging Face hub name
(``llava-hf/llava-1.5-7b-hf``: found in, or online downloaded into, the Hugging Face cache; the
offline check before a run is ``models/hub.py``), or ``random-tiny``, the tiny random LLaVA that
``demo.py`` writes into the stage's directory. Weights are held in ``pretrain.teacher_dtype``.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from fedllava import errors
from fedllava.pretrain import dwp
from fedllava.sharding import MODEL

TEACHER_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def looks_like_path(name: str) -> bool:
  """Whether ``name`` is meant as a local path (not a hub name)."""
  return name.startswith(("/", ".", "~")) or os.path.exists(name)


def resolve_teacher(name: str, field: str = "config.pretrain.teacher") -> str:
  """A llava-hf checkpoint directory for ``name``: a local directory, or a hub name found in (or,
  online, downloaded into) the Hugging Face cache. Raises ``ValueError`` naming ``field``."""
  if os.path.isdir(name):
    return name
  if not name or looks_like_path(name) or name.count("/") != 1:
    raise errors.ConfigError(
      f"{field}={name!r} is not a llava-hf checkpoint directory (config.json + "
      "model.safetensors or its shards); set it to one."
    )
  try:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    return snapshot_download(name, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001 - offline, unknown repo, no permission: one message
    raise errors.ConfigError(
      f"{field}={name!r}: no local directory of that name and the Hugging Face copy could not "
      f"be had ({type(e).__name__}: {str(e)[:200]}); download it (huggingface-cli download "
      f"{name}) and set {field} to the directory."
    ) from None


def load_checkpoint(config, path: str, **load_kwargs):
  """``(llava, params, tokenizer)`` of the llava-hf checkpoint at ``path``.

  Args:
    config: the run's config (``pretrain.teacher_dtype``, ``pretrain.tokenizer``).
    path: the checkpoint directory (``resolve_teacher``).
    **load_kwargs: passed on to ``convert.load_llava`` (``mesh``, ``axis_name``, ``remat``).

  Raises:
    errors.ConfigError: the checkpoint or tokenizer cannot be loaded, naming the field.
  """
  from fedllava.models import convert  # transformers only when a stage runs

  p = config.pretrain
  try:
    llava, params = convert.load_llava(path, dtype=TEACHER_DTYPES[p.teacher_dtype], **load_kwargs)
    tokenizer = convert.load_tokenizer(p.tokenizer or path)
  except (OSError, ValueError) as e:
    raise errors.ConfigError(
      f"config.pretrain.teacher={p.teacher!r} could not be loaded: {e}"
    ) from None
  return llava, params, tokenizer


def load_sharded(config, workdir: str, mesh):
  """DWP's frozen teacher: ``(llava, params FSDP-sharded over the mesh's model axis, tokenizer)``.

  ``random-tiny`` is written into ``workdir/teacher`` first (``demo.write_teacher``).
  """
  from fedllava.pretrain import demo

  p = config.pretrain
  if p.teacher == demo.RANDOM_TINY:
    path = demo.write_teacher(os.path.join(workdir, "teacher"), config.seed)
  else:
    path = resolve_teacher(p.teacher)
  llava, params, tokenizer = load_checkpoint(
    config, path, mesh=mesh, axis_name=MODEL, remat=p.remat
  )
  return llava, dwp.shard_teacher(params, mesh, TEACHER_DTYPES[p.teacher_dtype]), tokenizer
