"""Entry point: ``python -m fedllava.main --config=configs/digits_lt.py [--workdir=DIR]``.

Runs ``config.stages`` in order; rerunning the same command resumes from ``workdir``.
Overrides: ``--config.fl.rounds=5``; variants: ``--config=configs/cifar10_lt.py:if=50``.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fedllava import config as config_lib
from fedllava import federate, sharding

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<config name>).")

STAGE_RUNNERS = {"federate": federate.run}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = _CONFIG.value
  try:  # a bad field is reported, without a traceback, before anything is written
    config_lib.validate(config)
  except ValueError as e:
    raise app.UsageError(f"bad config: {e}") from None
  if config.model.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  sharding.maybe_initialize_distributed()
  workdir = _WORKDIR.value or config.workdir or os.path.join("workdirs", config.name)
  for stage in filter(None, config.stages.split(",")):
    STAGE_RUNNERS[stage](config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
