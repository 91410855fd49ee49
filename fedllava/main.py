"""Entry point: ``python -m fedllava.main --config=configs/digits_lt.py [--workdir=DIR]``.

Validates every config section, then chains ``config.stages`` in order (the paper's three
stages, the first in two steps: ``annotate`` -> ``pretrain`` -> ``federate`` -> ``align``),
handing each stage's result to the next.
Each stage writes under ``workdir/<stage>/``; a stage that is complete is loaded, not rerun;
rerunning the same command resumes wherever the run stopped. The run ends with the models
side by side (``workdir/report.json``, ``report.txt`` and two comparison figures).
Overrides: ``--config.fl.rounds=5``; variants: ``--config=configs/cifar10_lt.py:if=50``.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import math
import os
import re
import sys
import threading

import jax
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from fedllava import align, checkpoint, errors, federate, fileio, provenance, report, sharding
from fedllava.data import federated
from fedllava.federate import multirun
from fedllava.models import resnet
from fedllava.pretrain import annotate
from fedllava.pretrain import train as pretrain

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<config name>).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of a user error too.")

# The one stage registry: name -> module with run(config, workdir, init=None, ...).
STAGES = {"annotate": annotate, "pretrain": pretrain, "federate": federate, "align": align}
_VALIDATORS = (
  lambda c: pretrain.validate(c),
  lambda c: federated.validate(c),
  lambda c: resnet.validate(c.model),
  lambda c: federate.validate(c),
  lambda c: align.validate(c),
  lambda c: sharding.validate(c),
)
# The order stages chain in (each result is the next stage's start), and what a stage needs.
_ORDER = tuple(STAGES)
_NEEDS = {"align": "federate"}  # stage 3 aligns stage 2's model
# What a user can get wrong (a message, no traceback); anything else keeps its traceback.
USER_ERRORS = (errors.UserError,)


def stage_list(config) -> list[str]:
  return [s for s in config.stages.split(",") if s]


def validate(config) -> None:
  """Runs every section's validator; raises ``ValueError`` naming the first bad field."""
  for path, value in traverse_util.flatten_dict(config.to_dict(), sep=".").items():
    if isinstance(value, float) and not math.isfinite(value):
      raise errors.ConfigError(f"config.{path}={value} is not a finite number; set a real value.")
  if config.seed < 0:
    raise errors.ConfigError(f"config.seed={config.seed} must be >= 0.")
  stages = stage_list(config)
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise errors.ConfigError(
      f"config.stages={config.stages!r} names {unknown or 'no stage'}; the stages are "
      f"{list(STAGES)}, comma-separated, in order (e.g. 'federate,align')."
    )
  if len(set(stages)) != len(stages):
    raise errors.ConfigError(f"config.stages={config.stages!r} names a stage twice.")
  check_stage_order(config)
  for check in _VALIDATORS:
    check(config)


def check_stage_order(config) -> None:
  """The stages run in the registry's order, and a stage that starts from another finds it.

  Raises:
    ConfigError: naming ``config.stages`` and the order to use.
  """
  stages = stage_list(config)
  for i, later in enumerate(stages):
    for earlier in stages[i + 1 :]:
      if _ORDER.index(earlier) < _ORDER.index(later):
        if later == "align" and earlier == "federate":
          break  # the message below says why
        raise errors.ConfigError(
          f"config.stages={config.stages!r}: '{earlier}' must come before '{later}' (the "
          f"order is {', '.join(_ORDER)})."
        )
  for stage, needed in _NEEDS.items():
    if stage in stages and (needed not in stages or stages.index(needed) > stages.index(stage)):
      raise errors.ConfigError(
        f"config.stages={config.stages!r}: 'align' aligns stage 2's model, so '{needed}' must "
        "come before it."
      )


def _has_progress(workdir: str) -> bool:
  """Whether any stage saved a checkpoint here (then the workdir holds *a* run)."""
  stage_dirs = [os.path.join(workdir, d) for d in os.listdir(workdir)]
  return any(
    checkpoint.latest_saved_round(os.path.join(d, "checkpoints")) is not None
    for d in stage_dirs
    if os.path.isdir(d)
  )


MultiRunError = multirun.MultiRunError


def run_many(configs, workdirs, **kwargs):
  """Several pipelines that differ only in ``seed``, their stage-2 rounds in lockstep as one
  program (``federate/multirun.py``; the sweep's ``--runs_together``). ``kwargs``: ``runner``
  (default ``loop.run``; the sweep passes ``main.run``), ``return_exceptions``. Here, in the one
  module that chains the stages, so shared code (``sweep.py``) never imports a stage room."""
  return multirun.run_many(configs, workdirs, **kwargs)


def run(config, workdir: str, load_teacher=None, make_round_fn=None) -> dict:
  """Validates, then runs (or resumes) ``config.stages`` in ``workdir``.

  ``make_round_fn``: handed to stage 2 (``federate.run``); ``fedllava.sweep`` passes
  ``multirun``'s, which runs this run's rounds in one program with other seeds' runs.

  Returns:
    ``{stage name: StageResult}``, plus ``"federate_plain"`` (stage 2 without alignment)
    when alignment runs every round and the side-by-side baseline is computed.
  """
  validate(config)
  if config.model.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  stages = stage_list(config)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0  # multi-host: process 0 owns the workdir's own files
  with fileio.workdir_lock(workdir) if lead else contextlib.nullcontext():
    if lead:
      fileio.clean_stale_temporaries(workdir)
    changes = checkpoint.check_config(workdir, config, _has_progress(workdir))
    saved = provenance.saved_config(workdir)  # as the last run left it (legacy stage dirs)
    written = []

    def started():  # the first stage has built its data and model: the run can start
      if not written and lead:
        checkpoint.write_config(workdir, config, changes)
      written.append(True)

    results, result, upstream = {}, None, None
    every_round = "align" in stages and config.align.when == "every_round"
    for name in stages:
      kwargs = {}
      if name == "federate" and make_round_fn is not None:
        kwargs["make_round_fn"] = make_round_fn
      if name == "align" and load_teacher is not None:
        kwargs["load_teacher"] = load_teacher
      if name == "federate" and every_round:
        print("[pipeline] federate_plain: stage 2 without alignment, the side-by-side baseline")
        results["federate_plain"], _ = _run_stage(
          config,
          workdir,
          "federate_plain",
          federate.run,
          result,
          upstream,
          started,
          saved,
          **kwargs,
        )
        kwargs["after_round"] = align.make_round_hook(
          config, os.path.join(workdir, "align"), load_teacher
        )
      print(f"[pipeline] stage {name}")
      result, upstream = _run_stage(
        config, workdir, name, STAGES[name].run, result, upstream, started, saved, **kwargs
      )
      results[name] = result
    report.write_pipeline_report(workdir, results, stages, config.fl.algorithm, config.fl.rounds)
  return results


def _run_stage(config, workdir, name, run_fn, init, upstream, started, saved, **kwargs):
  """Runs one stage under its key (``provenance.py``); returns ``(result, its fingerprint)``.

  A stage directory built under another key (a changed field of the stage, or another upstream
  result) is set aside first, so the stage reruns; ``stage.json`` records the key once the stage
  starts and the result's fingerprint once it is complete.
  """
  stage_dir = os.path.join(workdir, name)
  stage_key = provenance.key(config, name, upstream)
  provenance.prepare(workdir, name, stage_key, saved)
  same = lambda record: record is not None and record.get("key") == stage_key  # noqa: E731

  def stage_started():
    started()
    if not same(provenance.read(stage_dir)):
      provenance.write(stage_dir, stage_key, None)

  result = run_fn(config, stage_dir, init, started=stage_started, **kwargs)
  fp = provenance.fingerprint(result)
  record = provenance.read(stage_dir)
  if not same(record) or record.get("result") != fp:
    if same(record) and record.get("result") not in (None, fp):
      print(f"[{name}] its result differs from the one recorded; the stages after it are redone")
    provenance.write(stage_dir, stage_key, fp)
  return result, fp


def _one_line(message: str, status: int = 1):
  """Ends the program with ``fedllava: <message>`` on stderr and ``status``."""
  print(f"fedllava: {message}".rstrip(), file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run``'s flags parser: a config file that does not load, or a ``--config.<field>`` that
  does not exist, is one message (ml_collections raises it while absl parses the flags)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl's own: an unknown flag, a value of the wrong type
    if not isinstance(e.__context__, (AttributeError, KeyError, SyntaxError)):
      _one_line(f"{e}; --helpfull lists the flags.")
    original = cause = e.__context__
  except (AttributeError, KeyError, SyntaxError) as e:
    original = cause = e
  if isinstance(cause, SyntaxError):
    _one_line(
      f"cannot load --config: {cause.filename}, line {cause.lineno}: {cause.msg}: "
      f"{(cause.text or '').strip()!r}; fix the config file."
    )
  texts = []  # ml_collections chains KeyError(key) -> KeyError(key + hint) -> AttributeError
  while cause is not None:
    arg = cause.args[0] if cause.args else ""
    texts.append(arg if isinstance(arg, str) else str(arg))
    cause = cause.__context__
  key = texts[-1].strip("'\"")
  close = re.search(r'Did you mean "([^"]+)"', " ".join(texts))
  hint = f"Did you mean {close.group(1)!r}?" if close else "Check it against the config file."
  given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key in a]
  if not given:  # not a --config.<field> of the command line: a bug, keep its traceback
    raise original
  _one_line(f"{given[0]}: the config has no field {key!r}. {hint}")


def _where_stopped(tb, workdir: str) -> str:
  """The stage that was running in ``tb`` (``run``'s frame), and its last checkpoint."""
  stage = None
  while tb is not None:
    if tb.tb_frame.f_code is run.__code__:
      stage = tb.tb_frame.f_locals.get("name")
    tb = tb.tb_next
  if stage is None:
    return f"before the first stage, in {workdir}"
  done = checkpoint.latest_saved_round(os.path.join(workdir, stage, "checkpoints"))
  last = f"last checkpoint: step {done}" if done is not None else "no checkpoint of it yet"
  return f"in stage {stage} ({last}; {os.path.join(workdir, stage)})"


def _quiet_disk_full() -> None:
  """Drops what threads log or raise about a full disk (orbax's writers each log a traceback):
  the main thread's one line says it, with the path and the fix."""

  def keep(record) -> bool:
    return not fileio.is_disk_full(record.exc_info[1] if record.exc_info else None) and not (
      fileio.is_disk_full(Exception(record.getMessage()))
    )

  for handler in pylogging.getLogger().handlers:
    handler.addFilter(keep)
  hook = threading.excepthook
  threading.excepthook = lambda args: None if fileio.is_disk_full(args.exc_value) else hook(args)


def config_from_flags():
  """``--config`` (with its ``--config.<field>`` overrides), or one line when it does not load."""
  try:
    config = _CONFIG.value
    config.name  # a config that failed to load raises on first use
  except (OSError, ValueError) as e:  # a missing or broken config file, or a bad variant
    _one_line(f"cannot load --config: {e}")
  return config


def run_cli(body, workdir: str, where_stopped) -> None:
  """Runs ``body()`` as a command: a user error, a full disk or Ctrl-C is one line on stderr.

  Args:
    body: what the command does.
    workdir: the directory it writes (named in a disk-full message).
    where_stopped: ``traceback -> str`` saying where an interrupted run stopped.
  """
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  _quiet_disk_full()
  try:
    fileio.check_workdir(workdir)
    body()
  except KeyboardInterrupt as e:
    _one_line(
      f"interrupted {where_stopped(e.__traceback__)}; rerun the same command to resume.", 130
    )
  except Exception as e:
    if _TRACEBACK.value:
      raise
    if fileio.is_disk_full(e):  # what was intact (a CheckpointError says) after the fix
      said = f" ({e})" if isinstance(e, errors.UserError) and not hasattr(e, "path") else ""
      _one_line(fileio.disk_full_message(getattr(e, "path", None) or workdir) + said)
    if not isinstance(e, USER_ERRORS):
      raise
    _one_line(f"{type(e).__name__}: {e}\n(--traceback shows where)")


def main(argv):
  del argv
  config = config_from_flags()
  workdir = _WORKDIR.value or config.workdir or os.path.join("workdirs", config.name)

  def body():
    sharding.maybe_initialize_distributed()
    run(config, workdir)

  run_cli(body, workdir, lambda tb: _where_stopped(tb, workdir))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
