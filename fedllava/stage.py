"""The stage contract (DESIGN.md, "The stage contract"): what every stage returns.

Every stage module exposes ``run(config, workdir, init=None) -> StageResult``. ``main.py``
chains ``config.stages`` in order, handing each result to the next stage as ``init``. Stages
never import each other; this type and the one handoff rule below are all they share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
from flax import traverse_util

from fedllava import errors


@dataclasses.dataclass
class StageResult:
  """What a stage hands to the next one.

  Attributes:
    variables: the FL model's Flax variables (``{"params", "batch_stats"}``) after the stage,
      or None for a stage that trains no FL model (annotation).
    report: the stage's summary (metrics, what it ran), JSON-serialisable.
    outputs: named files the stage wrote that a later stage may read (e.g. annotation JSON).
  """

  variables: Optional[Any] = None
  report: dict = dataclasses.field(default_factory=dict)
  outputs: dict = dataclasses.field(default_factory=dict)


def start_from(fresh: dict, init: dict) -> dict:
  """Stage 1's handoff: the pretrained backbone and feature MLP, with a fresh classifier.

  Args:
    fresh: this run's freshly initialised variables.
    init: a previous stage's variables (its classifier, if any, is dropped).
  Returns:
    ``fresh`` with every non-classifier leaf taken from ``init``.
  Raises:
    ValueError: ``init`` does not fit ``config.model`` (a missing, extra or reshaped leaf).
  """
  fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
  init_flat = {
    k: v
    for k, v in traverse_util.flatten_dict(init, sep="/").items()
    if "/classifier/" not in f"/{k}"
  }
  body = {k for k in fresh_flat if "/classifier/" not in f"/{k}"}
  problems = sorted(body ^ set(init_flat))
  problems += [
    f"{k}: {tuple(init_flat[k].shape)} vs {tuple(fresh_flat[k].shape)}"
    for k in sorted(body & set(init_flat))
    if tuple(init_flat[k].shape) != tuple(fresh_flat[k].shape)
  ]
  if problems:
    raise errors.ConfigError(
      "the pretrained model does not fit config.model (differences: "
      f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}); pretrain and "
      "federate must use the same config.model (name, width, mlp_dim)."
    )
  out = dict(fresh_flat)
  for k, v in init_flat.items():
    out[k] = jnp.asarray(v, fresh_flat[k].dtype)
  return traverse_util.unflatten_dict(out, sep="/")
