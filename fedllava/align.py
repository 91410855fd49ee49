"""Stage 3, global alignment on the server (paper Sec. 3.3, Eq. 5-6).

The aggregated model is fine-tuned on a small class-balanced set D_align held by the server:

  w_agg_new <- w_agg - eta * grad_w L_align(w_agg; D_align)               (Eq. 5)
  L_align = CE(y, p) + beta * KL(softmax(q / T) || softmax(p / T))       (Eq. 6)

with p the FL model's logits and q CLIP's zero-shot logits of the same image. D_align is
``align.per_class`` images of every class held out of the training pool *before* the long
tail (``data/federated.py``; never given to a client, never in the test set), or a user's own
folder of labelled images (``align.data_dir``; one sub-folder per class, named readably or by the
data set's label string; checked in ``validate``). q is computed once and cached on disk, keyed
by the images, the teacher and the prompts; the prompts name the classes readably
(``classnames.get_classnames``: "a photo of a tench.", never a synset id or a digit).

Choices (config fields, defaults with the reason):
  * ``align.params = "all"``: Eq. 5 moves every weight of w_agg; ``"head"`` moves the
    classifier only (backbone, feature MLP and BN statistics stay bit-identical).
  * ``align.when = "end"``: once after the last round, so the report compares the very same
    FedAvg model with and without alignment (the paper's Fig. 4); ``"every_round"`` aligns
    after each aggregation and clients receive the aligned model (``main.py`` passes
    ``make_round_hook`` to stage 2, which never imports this module).
  * ``align.bn = "train"``: BN uses batch statistics and updates its running statistics, as a
    PyTorch model in ``model.train()`` (the paper's code base) does when fine-tuned; D_align is
    class-balanced, so the running statistics move towards the balanced test distribution.
    ``"frozen"`` keeps them (eval-mode BN). Head-only alignment always freezes BN.
  * A fresh optimizer state for every alignment (like the clients' fresh local SGD).
  * Augmentation as in stage 2 (``data.crop_padding``, ``data.flip``, ``data.per_batch_augment``).

``run(config, workdir, init)`` aligns stage 2's model (``when="end"``) and writes under its
stage directory ``checkpoints/``, ``report.json`` and ``confusion.png``; a complete stage is
loaded, not rerun.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import zipfile
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedllava import checkpoint, errors, evaluate, fileio, predict, report, rng, sharding
from fedllava.data import augment, classnames, federated
from fedllava.models import hub, resnet
from fedllava.stage import StageResult

REPORT = "report.json"
WHEN = ("end", "every_round")
PARAMS = ("all", "head")
OPTIMIZERS = ("sgd", "adam")
BN_MODES = ("train", "frozen")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def validate(config) -> None:
  """Checks ``config.align`` before anything runs; raises ``ValueError`` naming the field."""
  a = config.align
  if a.per_class < 0:
    raise errors.ConfigError(
      f"config.align.per_class={a.per_class} must be >= 0 (0: hold nothing out)."
    )
  for field, choices in (("when", WHEN), ("params", PARAMS), ("optimizer", OPTIMIZERS)):
    if a[field] not in choices:
      raise errors.ConfigError(f"config.align.{field}={a[field]!r}; choose one of {choices}.")
  if a.bn not in BN_MODES:
    raise errors.ConfigError(f"config.align.bn={a.bn!r}; choose one of {BN_MODES}.")
  if not (a.learning_rate > 0 and math.isfinite(a.learning_rate)):
    raise errors.ConfigError(
      f"config.align.learning_rate={a.learning_rate} must be a finite number > 0."
    )
  if not 0 <= a.momentum < 1:
    raise errors.ConfigError(f"config.align.momentum={a.momentum} must be in [0, 1).")
  for field in ("epochs", "batch_size"):
    if a[field] < 1:
      raise errors.ConfigError(f"config.align.{field}={a[field]} must be >= 1.")
  if not (a.beta >= 0 and math.isfinite(a.beta)):
    raise errors.ConfigError(f"config.align.beta={a.beta} must be a finite number >= 0 (Eq. 6).")
  if not (a.temperature > 0 and math.isfinite(a.temperature)):
    raise errors.ConfigError(
      f"config.align.temperature={a.temperature} must be a finite number > 0."
    )
  stages = [s for s in config.stages.split(",") if s]
  if "align" not in stages:
    return
  if a.beta > 0 and not a.teacher:
    raise errors.ConfigError(
      f"config.align.beta={a.beta} needs a CLIP teacher for q, and config.align.teacher is "
      "empty: set --config.align.teacher=<CLIP hub name or local checkpoint directory>, or "
      "--config.align.beta=0 to align with cross-entropy only."
    )
  if a.beta > 0 and _looks_like_path(a.teacher) and not os.path.isdir(a.teacher):
    raise errors.ConfigError(
      f"config.align.teacher={a.teacher!r} is not a directory; point it to a CLIP checkpoint "
      "(Hugging Face layout: config.json + weights)."
    )
  if a.beta > 0:
    classnames.get_templates(a.templates)  # unknown template set -> clear error
    readable_names(config)  # no readable class names -> clear error, not prompts of digits
    hub.check_hub_teacher(a.teacher, "config.align.teacher")
  if a.data_dir:
    if not os.path.isdir(a.data_dir):
      raise errors.ConfigError(
        f"config.align.data_dir={a.data_dir!r} is not a directory (expected one sub-folder "
        "of images per class name)."
      )
    check_folder(a.data_dir, folder_index(config))  # before stage 2 runs, not after it
  elif a.per_class < 1:
    raise errors.ConfigError(
      "stage 'align' needs D_align: set config.align.per_class >= 1 (images held out per "
      "class) or config.align.data_dir (a folder of labelled images)."
    )
  if "federate" not in stages or stages.index("federate") > stages.index("align"):
    raise errors.ConfigError(
      f"config.stages={config.stages!r}: 'align' aligns stage 2's model, so 'federate' must "
      "come before it."
    )


def _looks_like_path(name: str) -> bool:
  return name.startswith(("/", ".", "~")) or os.path.exists(name)


# ---- class names: readable ones for CLIP's prompts, folder names for a user's D_align ----
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
      f"{len(names)} readable class names; fedllava/data/classnames.py does not match it."
    )
  return names


def _label_strings(config) -> tuple:
  """The data set's own label strings (TFDS: the builder's metadata), without its images."""
  d = config.data
  if d.name in ("cifar10", "cifar100", "imagenet_lt"):
    import tensorflow_datasets as tfds  # noqa: PLC0415 (only for a TFDS data set)

    builder = tfds.builder(d.name, data_dir=d.data_dir or None, file_format="array_record")
    return tuple(builder.info.features["label"].names or ())
  return federated._load(config, "test").class_names or ()  # digits, synthetic: cheap


def folder_index(config) -> dict:
  """``{folder name: label}`` for a user's D_align: the readable names (also with ``_`` for
  spaces, e.g. "aquarium_fish") and the data set's own label strings (e.g. "n01440764", "0").
  A name two classes claim maps to None (refused as ambiguous)."""
  try:
    readable = classnames.get_classnames(config.data.name)
  except ValueError:
    readable = []
  index = {}
  for names in (readable, [n.replace(" ", "_") for n in readable], _label_strings(config)):
    for label, name in enumerate(names):
      index[name] = label if index.get(name, label) == label else None
  return index


def alignment_loss(logits, labels, teacher_logits, weights, beta: float, temperature: float = 1.0):
  """The global alignment loss (Eq. 6), a weighted mean over examples.

  ``L = CE(y, p) + beta * KL(softmax(q / T) || softmax(p / T))``; no ``T**2`` factor (beta
  absorbs it).

  Args:
    logits: p, the FL model's logits ``[B, C]``.
    labels: y, int ``[B]``.
    teacher_logits: q, CLIP's zero-shot logits ``[B, C]``, or None (then ``beta`` must be 0).
    weights: ``[B]``; 0 marks a padding example.
    beta: weight of the KL term.
    temperature: T.
  Returns:
    ``(loss, {"ce": ..., "kl": ...})`` scalars.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  if teacher_logits is None:
    if beta:
      raise ValueError("beta > 0 needs teacher_logits (q)")
    kl = jnp.zeros_like(ce)
  else:
    log_q = jax.nn.log_softmax(teacher_logits.astype(logits.dtype) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  total = jnp.maximum(jnp.sum(weights), 1.0)
  mean = lambda v: jnp.sum(weights * v) / total  # noqa: E731
  return mean(ce + beta * kl), {"ce": mean(ce), "kl": mean(kl)}


def _optimizer(a) -> optax.GradientTransformation:
  if a.optimizer == "sgd":
    return optax.sgd(a.learning_rate, momentum=a.momentum or None)
  return optax.adam(a.learning_rate)


def create_aligner(
  model, align_config, *, num_examples: int, mean, std, crop_padding=0, flip=False, per_batch=False
) -> Callable:
  """Builds the jitted alignment loop: ``align(variables, images, labels, q, key)``.

  Runs ``align_config.epochs`` shuffled passes over D_align in batches of
  ``align_config.batch_size`` (the last batch padded with weight-0 examples, so every step has
  one shape), one optax step each (Eq. 5). ``q`` may be None when ``beta`` is 0.

  Returns:
    ``align(variables, uint8 images [N,H,W,C], labels [N], q [N,C] | None, key) ->
    (variables, {"align/loss", "align/ce", "align/kl"})`` (means over the steps).
  """
  a = align_config
  n = int(num_examples)
  b = min(int(a.batch_size), n)
  steps = -(-n // b)
  tx = _optimizer(a)
  head_only = a.params == "head"
  if head_only:
    tx = optax.multi_transform(
      {"head": tx, "frozen": optax.set_to_zero()},
      lambda params: {
        k: jax.tree.map(lambda _, k=k: "head" if k == "classifier" else "frozen", v)
        for k, v in params.items()
      },
    )
  bn_train = a.bn == "train" and not head_only
  beta, temperature = float(a.beta), float(a.temperature)

  def loss_fn(params, batch_stats, x, y, q, w):
    variables = {"params": params, "batch_stats": batch_stats}
    if bn_train:
      out, new = model.apply(variables, x, train=True, mask=w, mutable=["batch_stats"])
      batch_stats = new["batch_stats"]
    else:
      out = model.apply(variables, x, train=False)
    loss, aux = alignment_loss(out["logits"], y, q, w, beta, temperature)
    return loss, (batch_stats, aux)

  def align(variables, images, labels, q, key):
    params, stats = variables["params"], variables["batch_stats"]
    dtype = jnp.result_type(*jax.tree.leaves(params))
    k_plan, k_aug = jax.random.split(key)

    def epoch_plan(k):
      idx = jnp.concatenate([jax.random.permutation(k, n), jnp.zeros(steps * b - n, jnp.int32)])
      w = (jnp.arange(steps * b) < n).astype(dtype)
      return idx.reshape(steps, b), w.reshape(steps, b)

    idx, w = jax.vmap(epoch_plan)(jax.random.split(k_plan, a.epochs))
    idx, w = idx.reshape(-1, b), w.reshape(-1, b)
    step_keys = jax.random.split(k_aug, idx.shape[0])

    def body(carry, xs):
      params, stats, opt = carry
      i, wi, k = xs
      x = augment.augment(
        augment.normalize(images[i], mean, std, dtype), k, crop_padding, flip, per_batch
      )
      qi = None if q is None else q[i]
      (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, x, labels[i], qi, wi
      )
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), stats, opt), (loss, aux["ce"], aux["kl"])

    (params, stats, _), (loss, ce, kl) = jax.lax.scan(
      body, (params, stats, tx.init(params)), (idx, w, step_keys)
    )
    out = {"params": params, "batch_stats": stats}
    return out, {"align/loss": jnp.mean(loss), "align/ce": jnp.mean(ce), "align/kl": jnp.mean(kl)}

  return jax.jit(align)


# ---- D_align ----
@dataclasses.dataclass(frozen=True, eq=False)
class AlignSet:
  """D_align as the server holds it: uint8 images, labels, and where they came from."""

  images: np.ndarray
  labels: np.ndarray
  source: str  # "holdout:<dataset>" or the folder's real path
  ids: tuple  # held-out indices into the training split, or relative file paths


def _folder_images(root: str, index: dict) -> list:
  """``[(relative path, real path, label)]`` of ``root/<class folder>/<image>``, sorted.

  Raises:
    ValueError: an unknown or ambiguous class folder, or an image path escaping ``root``.
  """
  real_root = os.path.realpath(root)
  known = [k for k, v in index.items() if v is not None]  # readable names first
  out = []
  for entry in sorted(os.listdir(real_root)):
    folder = os.path.join(real_root, entry)
    if not os.path.isdir(folder):
      continue
    if index.get(entry) is None:
      what = "names two classes" if entry in index else "is not a class name of this data set"
      raise errors.ConfigError(
        f"config.align.data_dir: folder {entry!r} {what}; rename it to one of "
        f"{known[:10]}{' ...' if len(known) > 10 else ''}."
      )
    for name in sorted(os.listdir(folder)):
      if not name.lower().endswith(_IMAGE_SUFFIXES):
        continue
      path = os.path.realpath(os.path.join(folder, name))
      if os.path.commonpath([path, real_root]) != real_root:
        raise errors.ConfigError(
          f"config.align.data_dir: {entry}/{name} points outside {root}; refused."
        )
      out.append((f"{entry}/{name}", path, index[entry]))
  if not out:
    raise errors.ConfigError(
      f"config.align.data_dir={root!r} holds no images in class sub-folders."
    )
  return out


def _read_image(rel: str, path: str, image_shape=None) -> Optional[np.ndarray]:
  """Decodes one D_align image (resized to ``image_shape`` if given); an unreadable one, a
  decompression bomb included, is a ``ValueError`` naming it: dropping it would change D_align."""
  from PIL import Image  # noqa: PLC0415 (only for a user folder)

  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      if image_shape is None:
        return None
      im = im.resize((image_shape[1], image_shape[0]), Image.BILINEAR)
      return np.asarray(im, np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise errors.ConfigError(
      f"config.align.data_dir: cannot read {rel}: {e}; fix or remove the file."
    ) from None


def check_folder(root: str, index: dict) -> None:
  """Checks a user's D_align before anything runs: class folders, paths, every image decoded."""
  for rel, path, _ in _folder_images(root, index):
    _read_image(rel, path)


def load_folder(root: str, class_names, image_shape, *, index=None) -> AlignSet:
  """A user's D_align: ``root/<class name>/<image>``, resized to the data set's image shape.

  Args:
    class_names: the class names in label order (the folder names), unless ``index``
      (``{folder name: label}``, see ``folder_index``) is given.

  Raises:
    ValueError: an unknown class folder, an image path escaping ``root`` (e.g. a symlink),
      an unreadable image, or no image at all.
  """
  if index is None:
    index = {name: i for i, name in enumerate(class_names)}
  found = _folder_images(root, index)
  images = [_read_image(rel, path, image_shape) for rel, path, _ in found]
  return AlignSet(
    np.stack(images),
    np.asarray([label for *_, label in found], np.int32),
    os.path.realpath(root),
    tuple(rel for rel, *_ in found),
  )


def align_set(config, server: federated.ServerData) -> AlignSet:
  """D_align from ``config.align.data_dir`` if set, else the held-out balanced images."""
  if config.align.data_dir:
    shape = server.test.images.shape[1:3]
    return load_folder(config.align.data_dir, None, shape, index=folder_index(config))
  if server.align is None:
    raise errors.ConfigError(
      "no D_align: set config.align.per_class >= 1 or config.align.data_dir."
    )
  return AlignSet(
    server.align.images,
    server.align.labels,
    f"holdout:{config.data.name}",
    tuple(int(i) for i in server.align_indices),
  )


# ---- q: CLIP's zero-shot logits, cached ----
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
    dest_dir = os.path.join(os.path.dirname(path), "damaged")
    os.makedirs(dest_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = os.path.join(dest_dir, f"{os.path.basename(path)}-{stamp}"), 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(dest_dir, f"{os.path.basename(path)}-{stamp}-{n}")
    os.rename(path, dest)
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
    from fedllava.models import clip  # noqa: PLC0415 (transformers only when a teacher is used)

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


@dataclasses.dataclass(frozen=True, eq=False)
class _Context:
  server: federated.ServerData
  dset: AlignSet
  q: Optional[np.ndarray]
  model: object
  align_fn: Callable
  key: jax.Array
  names: list


def _prepare(config, workdir: str, load_teacher=None) -> _Context:
  server = federated.build_server_data(config)
  names = class_names(config, server.num_classes)
  dset = align_set(config, server)
  q = None
  if config.align.beta == 0:
    print(
      "[align] beta = 0: cross-entropy on D_align only, no KL(q || p) term (no CLIP teacher "
      "offline); set config.align.teacher and config.align.beta > 0 for the paper's Eq. 6."
    )
  else:
    cache = config.align.cache_dir or workdir
    q = zero_shot_q(config, dset, names, cache, load_teacher)
  model = resnet.create_model(config.model, server.num_classes)
  d = config.data
  align_fn = create_aligner(
    model,
    config.align,
    num_examples=len(dset.labels),
    mean=server.norm.mean,
    std=server.norm.std,
    crop_padding=d.crop_padding,
    flip=d.flip,
    per_batch=d.per_batch_augment,
  )
  key = rng.stream(config.seed, "align")
  return _Context(server, dset, q, model, align_fn, key, names)


def _apply(ctx: _Context, variables, round_index: int):
  device = jax.local_devices()[0]  # one device: D_align is small, no need to replicate work
  dev = lambda x: jax.device_put(x, device)  # noqa: E731
  out, m = ctx.align_fn(
    dev(variables),
    dev(ctx.dset.images),
    dev(ctx.dset.labels),
    None if ctx.q is None else dev(ctx.q),
    jax.random.fold_in(ctx.key, round_index),
  )
  return out, {k: float(v) for k, v in m.items()}


def make_round_hook(config, workdir: str, load_teacher=None) -> Callable[[int, dict], dict]:
  """Stage 3 as stage 2's ``after_round`` hook (``align.when = "every_round"``).

  Returns ``hook(rounds_completed, variables) -> aligned variables`` placed as the input was;
  the alignment of round r uses key ``fold_in(key, r)``, so a resumed run replays it exactly.
  """
  ctx = []  # built at the first call: nothing is read or written before stage 2 starts

  def hook(round_index: int, variables):
    if not ctx:
      os.makedirs(workdir, exist_ok=True)
      ctx.append(_prepare(config, workdir, load_teacher))
      print(
        f"[align] every round: {len(ctx[0].dset.labels)} D_align images, "
        f"beta={config.align.beta:g}, {config.align.epochs} epoch(s), params={config.align.params}"
      )
    shardings = jax.tree.map(lambda x: x.sharding, variables)
    out, _ = _apply(ctx[0], variables, round_index)
    return jax.device_put(out, shardings)

  return hook


def _test_evaluator(ctx: _Context, config) -> Callable[[dict], dict]:
  """``variables -> test report``; one predict function, compiled once for both evaluations."""
  mesh = sharding.create_client_mesh(config.mesh.num_devices or None)
  fn = predict.create_predict_fn(ctx.model, ctx.server.norm.mean, ctx.server.norm.std, mesh)
  test = ctx.server.test

  def evaluate_on_test(variables):
    variables = jax.device_put(variables, sharding.replicated(mesh))
    preds = predict.predict_all(fn, variables, test.images, config.eval.batch_size, mesh)
    return evaluate.classification_report(
      test.labels, preds, ctx.server.num_classes, ctx.server.class_counts
    )

  return evaluate_on_test


def run(
  config,
  workdir: str,
  init: Optional[StageResult] = None,
  *,
  started: Optional[Callable[[], None]] = None,
  load_teacher=None,
) -> StageResult:
  """Aligns stage 2's model (Eq. 5-6) once, or reports the per-round alignment stage 2 ran.

  Args:
    config: the run's config.
    workdir: this stage's directory.
    init: stage 2's result (its variables are aligned).
    started: called once the data and model are built, before this stage writes anything.
    load_teacher: CLIP loader override (tests).
  Returns:
    ``StageResult(aligned variables, report)`` with ``final`` (test report after alignment),
    ``before`` (for ``when="end"``) and the alignment's losses.
  """
  if init is None or init.variables is None:
    raise errors.ConfigError(
      "stage 'align' needs stage 2's model: put 'federate' before 'align' in config.stages."
    )
  if config.align.when == "every_round":  # it ran inside stage 2 (the hook); nothing to redo
    if started is not None:
      started()
    return StageResult(init.variables, {"when": "every_round", **init.report})
  path = os.path.join(workdir, REPORT)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 1)
  try:
    step, variables, _, notes = ckpt.restore_latest(init.variables)
    for note in notes:
      print(note)
    if os.path.exists(path) and step == 1:
      with open(path) as f:
        saved = json.load(f)
      if started is not None:
        started()
      print(f"[align] complete in {workdir}; loaded, not rerun")
      return StageResult(variables, saved)
    ctx = _prepare(config, workdir, load_teacher)
    if started is not None:
      started()
    evaluate_on_test = _test_evaluator(ctx, config)
    before = evaluate_on_test(init.variables)
    variables, losses = _apply(ctx, init.variables, config.fl.rounds)
    variables = jax.device_get(variables)
    if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables)):
      raise errors.DivergedError(
        "alignment produced a non-finite model; nothing was saved. Lower "
        "config.align.learning_rate and rerun."
      )
    after = evaluate_on_test(variables)
    a = config.align
    print(
      f"[align] {len(ctx.dset.labels)} D_align images ({ctx.dset.source}), beta={a.beta:g}, "
      f"T={a.temperature:g}, params={a.params}, {a.epochs} epoch(s): loss {losses['align/loss']:.4f}"
    )
    out = {
      "when": "end",
      "final": report.to_jsonable(after),
      "before": report.to_jsonable(before),
      "losses": losses,
      "d_align": {"size": len(ctx.dset.labels), "source": ctx.dset.source},
    }
    ckpt.save(1, variables, {"top1": after["top1"]}, force=True)
    if jax.process_index() == 0:
      report.save_confusion_png(
        after["confusion"], os.path.join(workdir, "confusion.png"), ctx.names
      )
      report.write_json(path, out)
    return StageResult(variables, out)
  finally:
    ckpt.close()
