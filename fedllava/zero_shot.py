"""CLIP's zero-shot logits of images, cached on disk, and the class names its prompts use.

Shared by stage 3 (q of D_align, Eq. 6's teacher) and by the FL methods that distill CLIP on the
clients (CLIP2FL's per-example teacher logits), so neither stage room imports the other.

The prompts name the classes readably (``classnames.get_classnames``: "a photo of a tench.",
never a synset id or a digit). q is computed once and cached on disk, keyed by the images, the
teacher and the prompts; a damaged cache file is derived data, set aside and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from typing import Optional

import numpy as np

from fedllava import errors, fileio
from fedllava.data import classnames
from fedllava.data.folder import AlignSet


def readable_names(config) -> list[str]:
  """The readable class names of ``config.data.name`` (``classnames.get_classnames``).

  CLIP's prompts need them ("a photo of a tench.", not "a photo of a n01440764.").

  Raises:
    ValueError: the data set has none (e.g. ``synthetic``), naming the fields and the fix.
  """
  a = config.align
  try:
    return classnames.get_classnames(config.data.name)
  except ValueError as e:
    raise errors.ConfigError(
      f"config.align.beta={a.beta:g} needs readable class names for CLIP's prompts, and "
      f"config.data.name={config.data.name!r} has none ({e}); set --config.align.beta=0 to "
      "align with cross-entropy only, or use a data set with class names."
    ) from None


def class_names(config, num_classes: int) -> list[str]:
  """Stage 3's class names (prompts, report): readable, or ``"0"..`` without any when beta = 0."""
  try:
    names = readable_names(config)
  except ValueError:
    if config.align.beta > 0:
      raise
    return [str(c) for c in range(num_classes)]  # no prompts: the names only label the report
  if len(names) != num_classes:
    raise errors.ConfigError(
      f"config.data.name={config.data.name!r} has {num_classes} classes but "
      f"{len(names)} readable class names; its spec in fedllava/data/registry.py does not match."
    )
  return names


def _q_key(config, dset: AlignSet, names) -> dict:
  return {
    "data": config.data.name,
    "source": dset.source,
    "ids_sha256": hashlib.sha256(json.dumps(list(dset.ids)).encode()).hexdigest(),
    "images_sha256": hashlib.sha256(np.ascontiguousarray(dset.images).tobytes()).hexdigest(),
    "teacher": config.align.teacher,
    "templates": classnames.get_templates(config.align.templates),
    "classnames": list(names),
  }


def _read_q_cache(path: str, blob: str, shape) -> Optional[np.ndarray]:
  """q from a cache file made with key ``blob``; None to recompute. A damaged file (not an
  npz, truncated, a flipped byte, empty) is derived data: moved to ``damaged/`` beside it."""
  try:
    with np.load(path, allow_pickle=False) as f:
      key, q = str(f["key"]), np.asarray(f["q"])
    if q.shape != shape or q.dtype != np.float32:
      raise ValueError(f"q has shape {q.shape} {q.dtype}, expected {shape} float32")
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    damaged = os.path.join(os.path.dirname(path), "damaged")
    dest = fileio.set_aside(path, damaged, os.path.basename(path))
    why = type(e).__name__
    print(f"[align] zero-shot q cache {path} is damaged ({why}); moved to {dest}; recomputing")
    return None
  return q if key == blob else None


def zero_shot_q(config, dset: AlignSet, names, cache_dir: str, load_teacher=None) -> np.ndarray:
  """CLIP's zero-shot logits q of D_align (float32 ``[N, C]``), from the cache when it matches.

  The cache file's name is a hash of the key (data set, D_align's ids and pixels, teacher,
  templates, class names); the key is also stored inside and compared on reading, so a changed
  template, teacher or hold-out recomputes. Written atomically; read without pickle; a damaged
  file is moved to ``damaged/`` in ``cache_dir`` (one printed line) and q recomputed.

  Args:
    load_teacher: ``name -> ClipTeacher`` (default ``ClipTeacher.load``); tests count calls.
  """
  key = _q_key(config, dset, names)
  blob = json.dumps(key, sort_keys=True)
  path = os.path.join(
    cache_dir, f"zero_shot_q-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"
  )
  if os.path.exists(path):
    q = _read_q_cache(path, blob, (len(dset.labels), len(names)))
    if q is not None:
      return q
  if load_teacher is None:
    from fedllava.models import clip  # transformers only when a teacher is used

    load_teacher = clip.ClipTeacher.load
  try:
    teacher = load_teacher(config.align.teacher)
  except (OSError, ValueError) as e:
    raise errors.ConfigError(
      f"config.align.teacher={config.align.teacher!r} could not be loaded ({e}); point it to a "
      "local CLIP checkpoint directory, or set config.align.beta=0 to align without q."
    ) from None
  emb = teacher.class_embeddings(list(names), key["templates"])
  q = np.asarray(teacher.zero_shot_logits(dset.images, emb, batch_size=config.eval.batch_size))
  buf = io.BytesIO()
  np.savez(buf, q=q.astype(np.float32), key=np.asarray(blob))
  with fileio.atomic_open(path, "wb") as f:
    f.write(buf.getvalue())
  print(f"[align] zero-shot q of {len(q)} images from {config.align.teacher} cached in {path}")
  return q.astype(np.float32)


def _require_teacher(config, method: str) -> None:
  if not config.align.teacher:
    raise errors.ConfigError(
      f"config.fl.algorithm={method!r} distills CLIP's zero-shot predictions and needs a CLIP: "
      "set config.align.teacher (hub name or local CLIP directory); it is empty."
    )


def _load(config, load_teacher):
  if load_teacher is None:
    from fedllava.models import clip  # transformers only when a teacher is used

    load_teacher = clip.ClipTeacher.load
  try:
    return load_teacher(config.align.teacher)
  except (OSError, ValueError) as e:
    raise errors.ConfigError(
      f"config.align.teacher={config.align.teacher!r} could not be loaded ({e}); point it to a "
      "local CLIP checkpoint directory."
    ) from None


def client_teacher_logits(
  config,
  images: np.ndarray,
  names,
  templates: str,
  cache_dir: str,
  *,
  method: str,
  load_teacher=None,
):
  """CLIP's zero-shot logits of every client image and its class text embeddings.

  The per-example side array of a method with ``side_data="teacher_logits"`` (CLIP2FL): float32
  ``[K, N_max, C]`` for the padded client store ``images`` ``[K, N_max, H, W, 3]`` (padding rows
  get their copy's logits; their weight is 0), and the unit class embeddings ``[C, D]`` from
  the same prompts. Cached like ``zero_shot_q``: keyed by the data set, the store's pixels,
  the teacher, the prompts and the class names; a damaged file is set aside and recomputed.

  Raises:
    ConfigError: ``config.align.teacher`` is empty or cannot be loaded.
  """
  _require_teacher(config, method)
  key = {
    "data": config.data.name,
    "images_sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
    "shape": list(images.shape),
    "teacher": config.align.teacher,
    "templates": classnames.get_templates(templates),
    "classnames": list(names),
  }
  blob = json.dumps(key, sort_keys=True)
  path = os.path.join(
    cache_dir, f"client_zero_shot-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"
  )
  k, n = images.shape[:2]
  if os.path.exists(path):
    q = _read_q_cache(path, blob, (k * n, len(names)))
    if q is not None:
      with np.load(path, allow_pickle=False) as f:
        return q.reshape(k, n, -1), np.asarray(f["emb"], np.float32)
  teacher = _load(config, load_teacher)
  emb = np.asarray(teacher.class_embeddings(list(names), key["templates"]), np.float32)
  flat = images.reshape((k * n,) + images.shape[2:])
  q = np.asarray(teacher.zero_shot_logits(flat, emb, batch_size=config.eval.batch_size))
  q = q.astype(np.float32)
  os.makedirs(cache_dir, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, q=q, emb=emb, key=np.asarray(blob))
  with fileio.atomic_open(path, "wb") as f:
    f.write(buf.getvalue())
  print(f"[fl] zero-shot logits of {k}x{n} client images from {config.align.teacher} in {path}")
  return q.reshape(k, n, -1), emb
