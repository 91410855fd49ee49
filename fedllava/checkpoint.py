"""Atomic, resumable checkpoints (orbax ``CheckpointManager``) and the run's config guard.

orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save keeps its previous checkpoint. A rerun of the same command finds the latest
step and continues; because every random choice is derived from the config seed and the
round number, the resumed run ends with the same parameters as one never interrupted.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from fedllava import fileio

# Fields that may differ between a run and its resumption (how long, how often, where).
_RESUMABLE_CHANGES = (
  "fl.rounds",
  "checkpoint.",
  "eval.",
  "mesh.",
  "fl.client_parallelism",
  "fl.group_size",
  "data.placement",
  "workdir",
  "data.data_dir",
  "data.manual_dir",
)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_config(workdir: str, config) -> None:
  """Saves ``config.json`` on a new run; on resume, refuses a config that changes the science.

  Raises:
    ValueError: naming the changed fields and the fix (a new ``--workdir``).
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = _flatten(json.load(f))
    now = _flatten(current)
    changed = sorted(
      k
      for k in set(saved) | set(now)
      if saved.get(k) != now.get(k) and not any(k.startswith(p) for p in _RESUMABLE_CHANGES)
    )
    if changed:
      raise ValueError(
        f"{workdir} holds a run with a different config ({', '.join(changed)}); "
        "resuming would mix two experiments. Use a new --workdir, or restore "
        "those fields."
      )
    return
  fileio.atomic_write_text(path, config.to_json_best_effort(indent=2))


class Checkpointer:
  """Saves ``{state, meta}`` every ``every`` rounds, keeps the last ``keep``."""

  def __init__(self, directory: str, every: int, keep: int):
    self._manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, create=True, enable_async_checkpointing=False
      ),
    )

  def latest_round(self) -> int | None:
    """The last completed round that was saved, or None."""
    return self._manager.latest_step()

  def save(self, round_index: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Saves after round ``round_index`` if the interval says so (or ``force``)."""
    return self._manager.save(
      round_index,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=force,
    )

  def restore(self, round_index: int, like: Any) -> tuple[Any, dict]:
    """Restores the state (shaped and sharded like ``like``) and the metadata."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(
      round_index,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return out.state, dict(out.meta)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
