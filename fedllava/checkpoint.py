"""Atomic, verified, resumable checkpoints (orbax ``CheckpointManager``) and the run's config guard.

orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save keeps its previous checkpoint. A rerun of the same command finds the latest
step and continues; because every random choice is derived from the config seed and the
round number, the resumed run ends with the same parameters as one never interrupted.

Safety on top of orbax:

* Every saved state carries a checksum (sha256 over each leaf's dtype, shape and bytes, in
  tree order), kept in the step's JSON ``meta`` item under the reserved key ``"_integrity"``
  and verified on restore, so a flipped bit is caught rather than trained on.
* ``Checkpointer.restore_latest`` treats a step that cannot be read or fails its checksum as
  damaged: it moves the step directory to ``<directory>/damaged/<step>-<UTC time>`` (never
  deletes it; orbax ignores that folder), reports it in one line, and falls back to the
  previous step, or to scratch when none is left.
* ``Checkpointer.save`` refuses a state with a NaN or infinity (``FloatingPointError``), so
  rotation (``keep``) can never push out the last finite checkpoint; an ``OSError`` while
  saving (a full disk) becomes one ``CheckpointError`` saying which checkpoint is intact.
* ``check_config`` / ``write_config``: the fields changed since the last run of the workdir are
  logged in ``resume_log.json`` next to ``config.json``; which stages they rerun is decided per
  stage (``provenance.py``).
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from fedllava import errors, fileio

CONFIG_FILE = "config.json"
RESUME_LOG_FILE = "resume_log.json"
DAMAGED_DIR = "damaged"  # under the checkpoint directory; not a step name, so orbax ignores it
_INTEGRITY_KEY = "_integrity"  # reserved key in the saved meta dict


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint could not be written or used; the message says what is intact and what to do."""


class _DamagedCheckpoint(Exception):
  """Internal: a step cannot be read back or fails its checksum."""


# --------------------------------------------------------------------------------------------
# Config guard.


def _canonical(value: Any) -> str:
  # NaN != NaN, but json.dumps(nan) == json.dumps(nan): the same command is the same run.
  return json.dumps(value, sort_keys=True)


def _flat_config(config) -> dict:
  return traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")


def _read_json(path: str, what: str, fix: str) -> dict:
  """A JSON object from ``path``; a damaged file is one message: the file, ``what`` it is, ``fix``."""
  try:
    with open(path, "rb") as f:
      value = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    value, reason = None, f"{type(e).__name__}: {e}"
  else:
    reason = f"holds a JSON {type(value).__name__}, not an object"
  if isinstance(value, dict):
    return value
  raise errors.DamagedFileError(f"{path} is damaged ({reason}); it is {what}. {fix}")


_CONFIG_FIX = (
  "Restore it from a backup, or move it away and rerun (this command's config is then "
  "taken as the run's), or use a new --workdir."
)


def check_config(workdir: str, config, has_progress: bool) -> list[str]:
  """The fields in which ``config`` differs from the one that last ran in ``workdir``.

  Nothing is refused here: each stage's result is keyed by exactly the fields it depends on
  (``provenance.py``), so a changed field reruns the stages it reaches and only those.

  Args:
    workdir: the run's directory.
    config: the run's ``ConfigDict``.
    has_progress: whether the workdir holds a completed checkpoint. Without progress the workdir
      is never "another experiment": ``[]`` is returned.
  Returns:
    The changed fields, sorted; pass them to ``write_config`` so the change is logged.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not has_progress or not os.path.exists(path):
    return []
  saved = _read_json(path, "the config of the run saved here", _CONFIG_FIX)
  saved = traverse_util.flatten_dict(saved, sep=".")
  now = _flat_config(config)
  return sorted(
    k for k in set(saved) | set(now) if _canonical(saved.get(k)) != _canonical(now.get(k))
  )


def append_resume_log(workdir: str, entry: dict) -> None:
  """Appends ``entry`` to ``<workdir>/resume_log.json`` (``{"resumed": [...]}``), atomically."""
  log_path = os.path.join(workdir, RESUME_LOG_FILE)
  log = {"resumed": []}
  if os.path.exists(log_path):
    log = _read_json(
      log_path, "the log of resumed changes", "Move it away and rerun (a new log is begun)."
    )
  log.setdefault("resumed", []).append(entry)
  fileio.atomic_write_text(log_path, json.dumps(log, indent=2))


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_config(workdir: str, config, resumed_changes: Sequence[str] = ()) -> None:
  """Writes ``config.json`` (replacing any) once the run can start; logs the changed fields.

  Call after the data and the model are built, so that a run that fails to start leaves the
  workdir as it was. ``resumed_changes`` (from ``check_config``) are appended to
  ``resume_log.json`` as ``{"time": ISO-8601 UTC, "changed": {field: [old, new]}}`` before
  ``config.json`` is replaced by the new config.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if resumed_changes and os.path.exists(path):
    old = _read_json(path, "the config of the run saved here", _CONFIG_FIX)
    old = traverse_util.flatten_dict(old, sep=".")
    now = _flat_config(config)
    append_resume_log(
      workdir, {"time": _now(), "changed": {k: [old.get(k), now.get(k)] for k in resumed_changes}}
    )
  fileio.atomic_write_text(path, config.to_json_best_effort(indent=2))


# --------------------------------------------------------------------------------------------
# State checks.


def _host_leaves(state: Any):
  """Yields ``(path string, numpy array)`` for each leaf, one leaf on the host at a time."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    yield jax.tree_util.keystr(path), np.asarray(jax.device_get(leaf))


def state_digest(state: Any, *, step: int | None = None, check_finite: bool = False) -> str:
  """sha256 over every leaf's dtype, shape and C-order bytes, in ``jax.tree`` order.

  Raises:
    FloatingPointError: with ``check_finite``, naming the step and the first leaf holding a NaN
      or an infinity.
  """
  h = hashlib.sha256()
  for name, x in _host_leaves(state):
    if check_finite and jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(x).all():
      raise FloatingPointError(
        f"round {step}: {name} holds a non-finite value (NaN or inf); not saving it, so the "
        "last finite checkpoint stays"
      )
    h.update(f"{x.dtype.name}{x.shape};".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def _norm_path(path) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _leaf_specs(tree) -> dict:
  return {
    _norm_path(p): (tuple(leaf.shape), jnp.dtype(leaf.dtype).name)
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _reason(e: BaseException) -> str:
  text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= 200 else text[:197] + "..."


def _is_io_error(e: BaseException) -> bool:
  """OSError anywhere in the chain, or a TensorStore write error carrying an OS error code."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) or "os_error_code=" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def latest_saved_round(directory: str) -> int | None:
  """The newest step directory under ``directory`` (not verified), or None; creates nothing."""
  steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
  return max(steps) if steps else None


# --------------------------------------------------------------------------------------------
# Checkpointer.


class Checkpointer:
  """Saves ``{state, meta}`` every ``every`` rounds, keeps the last ``keep``; verifies restores."""

  def __init__(self, directory: str, every: int, keep: int):
    self._directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self._directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=every,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,  # unfinished saves of a killed run
      ),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  @property
  def directory(self) -> str:
    return self._directory

  def latest_round(self) -> int | None:
    """The last round saved (not verified: ``restore_latest`` checks it), or None."""
    return self._manager.latest_step()

  def save(self, round_index: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Saves after round ``round_index`` if the interval says so (or ``force``).

    Returns:
      Whether a checkpoint was written.
    Raises:
      FloatingPointError: the state holds a NaN or an infinity (nothing is written).
      CheckpointError: the write failed (e.g. disk full); the message names the intact round.
    """
    if not (force or self._manager.should_save(round_index)):
      return False
    if _INTEGRITY_KEY in meta:
      raise ValueError(f"meta key {_INTEGRITY_KEY!r} is reserved for the checkpoint checksum")
    digest = state_digest(state, step=round_index, check_finite=True)
    meta = {**meta, _INTEGRITY_KEY: {"sha256": digest, "of": "dtype, shape, bytes of each leaf"}}
    try:
      return self._manager.save(
        round_index,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
      )
    except Exception as e:
      if not _is_io_error(e):
        raise
      self._discard_unfinished(round_index)
      last = latest_saved_round(self._directory)
      if last is None:
        intact = "no earlier checkpoint exists"
      else:
        intact = f"the last checkpoint, round {last}, is intact"
      try:
        self._manager.reload()
      except Exception:  # the disk may still be failing; the message above is what matters
        pass
      if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        intact += f"; free space in {self._directory} and rerun to resume"
      raise CheckpointError(f"could not save round {round_index} ({_reason(e)}): {intact}") from e

  def _discard_unfinished(self, step: int) -> None:
    """Removes orbax's temporary directory of a failed save (never a finished step)."""
    for name in os.listdir(self._directory) if os.path.isdir(self._directory) else []:
      if name.startswith(f"{step}.orbax-checkpoint-tmp"):
        shutil.rmtree(os.path.join(self._directory, name), ignore_errors=True)

  def _restore_verified(self, step: int, like: Any) -> tuple[Any, dict, bool]:
    """Returns ``(state, meta, verified)``; ``verified`` is False for a step saved without a
    checksum (before checksums were kept). Raises ``_DamagedCheckpoint`` or ``CheckpointError``.
    """
    try:
      saved = self._manager.item_metadata(step)
      tree = saved["state"].tree if "state" in saved else None
      if tree is None:
        raise _DamagedCheckpoint("no state item (empty or partial step directory)")
      saved_specs = _leaf_specs(tree)
    except _DamagedCheckpoint:
      raise
    except Exception as e:
      raise _DamagedCheckpoint(_reason(e)) from e
    want = _leaf_specs(like)
    if saved_specs != want:
      diff = sorted(set(saved_specs) ^ set(want)) or sorted(
        k for k in want if saved_specs[k] != want[k]
      )
      k = diff[0]
      raise CheckpointError(
        f"checkpoint round {step} in {self._directory} holds a state of another shape than this "
        f"run builds (first difference: {'.'.join(k)}: checkpoint {saved_specs.get(k)}, this run "
        f"{want.get(k)}); use a new --workdir, or the code and config that wrote it"
      )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      out = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
      )
      meta = dict(out.meta)
      integrity = meta.pop(_INTEGRITY_KEY, None)
      digest = state_digest(out.state)
    except Exception as e:
      raise _DamagedCheckpoint(_reason(e)) from e
    if integrity is None:
      return out.state, meta, False
    if integrity.get("sha256") != digest:
      raise _DamagedCheckpoint("checksum mismatch: the array data changed after it was saved")
    return out.state, meta, True

  def restore(self, round_index: int, like: Any) -> tuple[Any, dict]:
    """Restores one step (shaped and sharded like ``like``) and its metadata, verified.

    Raises:
      CheckpointError: the step is damaged or does not match ``like`` (nothing is moved).
    """
    try:
      return self._restore_verified(round_index, like)[:2]
    except _DamagedCheckpoint as e:
      raise CheckpointError(f"checkpoint round {round_index} is damaged ({e})") from e

  def restore_latest(self, like: Any) -> tuple[int, Any, dict, list[str]]:
    """Restores the newest intact step; damaged newer steps are set aside, not deleted.

    Args:
      like: the freshly initialised state: the tree, shapes, dtypes and shardings to restore.
    Returns:
      ``(round, state, meta, messages)``: the round restored (0 when none: then ``state`` is
      ``like`` and ``meta`` is ``{}``), and one line per damaged step found, saying where it was
      moved and what the run resumes from (and one for a step saved before checksums were
      kept, restored unverified). The caller prints them.
    Raises:
      CheckpointError: a step is readable but does not match ``like`` (a code/config change).
    """
    messages = []
    self._manager.reload()
    while (step := self._manager.latest_step()) is not None:
      try:
        state, meta, verified = self._restore_verified(step, like)
        if not verified:
          messages.append(
            f"[checkpoint] round {step} has no checksum (saved before checksums were kept); "
            "restored it unverified"
          )
        return step, state, meta, messages
      except _DamagedCheckpoint as e:
        moved = self._set_aside(step)
        self._manager.reload()
        prev = self._manager.latest_step()
        if prev is None:
          then = "no earlier checkpoint is left, starting from scratch"
        else:
          then = f"resuming from round {prev}"
        messages.append(f"[checkpoint] round {step} is damaged ({e}); moved it to {moved}; {then}")
    return 0, like, {}, messages

  def _set_aside(self, step: int) -> str:
    src = os.path.join(self._directory, str(step))
    return fileio.set_aside(src, os.path.join(self._directory, DAMAGED_DIR), str(step))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
