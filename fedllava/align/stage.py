"""Stage 3's driver: ``validate``, ``run`` (align once at the end) and the per-round hook."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Optional

import jax
import numpy as np

from fedllava import checkpoint, errors, report, rng, sharding, supervised
from fedllava.align.loss import create_aligner
from fedllava.data import classnames, federated
from fedllava.data.folder import AlignSet, check_folder, folder_index, load_folder
from fedllava.models import hub, resnet
from fedllava.stage import StageResult
from fedllava.zero_shot import class_names, readable_names, zero_shot_q

REPORT = "report.json"
WHEN = ("end", "every_round")
PARAMS = ("all", "head")
OPTIMIZERS = ("sgd", "adam")
BN_MODES = ("train", "frozen")


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


def _looks_like_path(name: str) -> bool:
  return name.startswith(("/", ".", "~")) or os.path.exists(name)


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
  device = sharding.server_device()
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
  return supervised.create_test_evaluator(
    ctx.model,
    ctx.server.norm,
    ctx.server.test,
    sharding.create_client_mesh(config.mesh.num_devices or None),
    config.eval.batch_size,
    ctx.server.num_classes,
    ctx.server.class_counts,
  )


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
