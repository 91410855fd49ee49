"""The stage contract (DESIGN.md, "The stage contract"): what every stage returns.

Every stage module exposes ``run(config, workdir, init=None) -> StageResult``. ``main.py``
chains ``config.stages`` in order, handing each result to the next stage as ``init``. Stages
never import each other; this type is the only thing they share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


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
