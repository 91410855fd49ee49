"""Stage keys: a stage's result is keyed by exactly what it depends on (DESIGN.md, "Reproducibility
and safety"), as a build system or DVC keys a build step.

A stage's key is its own config fields (``DEPENDS_ON``, minus ``NOT_IN_KEY``: fields that say how
long, how often or where a stage runs, never what it computes up to the point reached) plus the
fingerprint of the result it starts from (the previous stage's, ``None`` for the first). The
key is kept in ``<workdir>/<stage>/stage.json`` with the fingerprint of the stage's own result
once it is complete:

* same key: the stage resumes where it stopped, or is loaded when complete (the stage decides:
  raising ``fl.rounds`` continues stage 2 to the new round count);
* another key (a field of the stage changed, or the result it starts from is not the one it was
  built on): the stage's directory is moved to ``<workdir>/superseded/<stage>-<UTC time>``
  (never deleted) and the stage reruns; so do the stages after it, because its new result has a
  new fingerprint. A field of a later stage never reaches an earlier stage's key;
* every such decision is appended to ``resume_log.json`` with the reason.

A result's fingerprint is the sha256 of its variables (dtype, shape, bytes of every leaf,
``checkpoint.state_digest``), or of its output files for a stage without variables (annotate).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Optional

import jax
from flax import traverse_util

from fedllava import algorithms, checkpoint, fileio
from fedllava.data import federated
from fedllava.stage import StageResult

STAGE_FILE = "stage.json"
SUPERSEDED_DIR = "superseded"

# Config fields each stage's result depends on (a prefix ending in "." is a whole section).
DEPENDS_ON = {
  "annotate": (
    "seed",
    "pretrain.teacher",
    "pretrain.tokenizer",
    "pretrain.teacher_dtype",
    "pretrain.demo",
    "pretrain.demo_images",
    "pretrain.unlabeled_dir",
    "pretrain.annotate.",
  ),
  "pretrain": ("seed", "pretrain.", "model.", "data.name", "data.image_size"),
  "federate": ("seed", "data.", "model.", "fl."),
  "align": ("seed", "data.", "model.", "align."),
}
# How long, how often, where: a change continues the stage, it is not a new result.
NOT_IN_KEY = (
  "fl.rounds",  # stage 2 continues to the new count; its new result re-keys stage 3
  "fl.client_parallelism",  # vmap / map / group: equal results (float64 tests)
  "fl.group_size",
  "data.placement",
  "data.data_dir",
  "data.manual_dir",
  "data.download",
  "pretrain.max_steps",  # stage 1 continues to the new step count
  "pretrain.worker_count",
  "pretrain.checkpoint_every",
  "pretrain.checkpoint_keep",
  "pretrain.peak_tflops",
  "pretrain.annotate.batch_size",  # prompts per generate call: the same greedy answers
  "pretrain.fewshot.",  # Table 4's ablation, not the pipeline
  "align.cache_dir",
)
_OF_ANOTHER_STAGE = {"pretrain": ("pretrain.annotate.",)}


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _flat(config) -> dict:
  return traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")


def _matches(field: str, patterns) -> bool:
  return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def fields(config, stage: str) -> dict:
  """The config fields ``stage``'s result depends on, ``{dotted name: value}``.

  Besides ``DEPENDS_ON``: stage 2 depends on the D_align hold-out (it shrinks the training pool)
  and, when alignment runs inside it every round, on every ``align`` field.
  """
  flat = _flat(config)
  base = stage.split("_plain")[0]  # federate_plain: stage 2 without the per-round alignment
  skip = NOT_IN_KEY + _OF_ANOTHER_STAGE.get(base, ())
  out = {k: v for k, v in flat.items() if _matches(k, DEPENDS_ON[base]) and not _matches(k, skip)}
  if base == "federate":  # another method's hyperparameters are not this run's
    name = config.fl.algorithm
    mine = algorithms.config_sections(name) if name in algorithms.METHODS else ()
    others = [f"fl.{s}." for s in algorithms.method_sections() if s not in mine]
    out = {k: v for k, v in out.items() if not _matches(k, others)}
    stages = [s for s in config.stages.split(",") if s]
    out["derived.holdout_per_class"] = holdout_per_class(config)
    if stage == "federate" and "align" in stages and config.align.when == "every_round":
      out.update({k: v for k, v in flat.items() if k.startswith("align.")})
      out.pop("align.cache_dir", None)
  return dict(sorted(out.items()))


def holdout_per_class(config) -> int:
  """Images per class held out of the training pool for D_align (``data/federated.py``)."""
  return int(config.align.per_class) if federated.needs_server_holdout(config) else 0


def key(config, stage: str, upstream: Optional[str]) -> dict:
  """``{"fields": ..., "upstream": fingerprint of the result the stage starts from}``."""
  return {"fields": fields(config, stage), "upstream": upstream}


def fingerprint(result: StageResult) -> str:
  """sha256 of a stage's result: its variables, else its output files (name and bytes)."""
  if result.variables is not None:
    return checkpoint.state_digest(result.variables)
  h = hashlib.sha256()
  for name, path in sorted(result.outputs.items()):
    h.update(f"{name}={path};".encode())
    if os.path.isfile(path):
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
  return h.hexdigest()


def read(stage_dir: str) -> Optional[dict]:
  """The stage's record, or None when there is none (or it cannot be read: then it is redone)."""
  path = os.path.join(stage_dir, STAGE_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError, UnicodeDecodeError):
    return {"unreadable": path}
  return record if isinstance(record, dict) else {"unreadable": path}


def write(stage_dir: str, stage_key: dict, result: Optional[str]) -> None:
  """Records ``stage_key`` (and the result's fingerprint once complete) in ``stage.json``."""
  if jax.process_index() != 0:
    return
  record = {"key": stage_key, "complete": result is not None, "result": result}
  fileio.atomic_write_text(os.path.join(stage_dir, STAGE_FILE), json.dumps(record, indent=1))


def _has_output(stage_dir: str) -> bool:
  return os.path.isdir(stage_dir) and any(n != STAGE_FILE for n in os.listdir(stage_dir))


def why_stale(record: Optional[dict], stage_key: dict) -> Optional[str]:
  """Why a stage's directory cannot be reused under ``stage_key`` (None: it can)."""
  if record is None:
    return None
  if "unreadable" in record:
    return f"its record {record['unreadable']} cannot be read"
  old = record.get("key") or {}
  old_fields, new_fields = old.get("fields", {}), stage_key["fields"]
  changed = sorted(
    k
    for k in set(old_fields) | set(new_fields)
    if json.dumps(old_fields.get(k)) != json.dumps(new_fields.get(k))
  )
  if changed:
    shown = ", ".join(f"{k}: {old_fields.get(k)!r} -> {new_fields.get(k)!r}" for k in changed[:6])
    return f"its config changed ({shown}{' ...' if len(changed) > 6 else ''})"
  if old.get("upstream") != stage_key["upstream"]:
    return "the result it was built on changed (the previous stage was redone or continued)"
  return None


def legacy_key(stage: str, config_json: Optional[dict]) -> Optional[dict]:
  """The key of a stage directory written before stage records existed, from ``config.json``."""
  if config_json is None:
    return None
  from ml_collections import ConfigDict

  try:
    return {"fields": fields(ConfigDict(config_json), stage)}
  except (KeyError, AttributeError, TypeError, ValueError):
    return None


def prepare(
  workdir: str, stage: str, stage_key: dict, saved_config: Optional[dict] = None, log=print
) -> None:
  """Before ``stage`` runs: sets its directory aside when its record does not match ``stage_key``.

  A directory with a record of another key (or an unreadable record) is moved to
  ``<workdir>/superseded/<stage>-<UTC time>`` and the move is logged (printed and appended to
  ``resume_log.json``). A directory with output but no record (an older fedllava) is judged by
  ``saved_config``, the workdir's ``config.json`` as it was before this run (``saved_config()``).
  A directory without output is simply reused.
  """
  stage_dir = os.path.join(workdir, stage)
  if not _has_output(stage_dir):
    return
  record = read(stage_dir)
  if record is None:
    record = legacy_key(stage, saved_config)
    if record is None:
      return  # nothing to judge by: trust it, as fedllava did before stage records
    reason = why_stale({"key": {**record, "upstream": stage_key["upstream"]}}, stage_key)
  else:
    reason = why_stale(record, stage_key)
  if reason is None:
    return
  if jax.process_index() == 0:
    dest = fileio.set_aside(stage_dir, os.path.join(workdir, SUPERSEDED_DIR), stage)
    log(f"[{stage}] redone: {reason}; the old result is kept in {dest}")
    checkpoint.append_resume_log(
      workdir, {"time": _now(), "stage": stage, "redone": reason, "set_aside": dest}
    )
  _sync(f"prepare-{stage}")


def saved_config(workdir: str) -> Optional[dict]:
  """The workdir's ``config.json`` (the last run's config), or None if absent or unreadable."""
  try:
    with open(os.path.join(workdir, checkpoint.CONFIG_FILE), encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError, UnicodeDecodeError):
    return None
  return saved if isinstance(saved, dict) else None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
