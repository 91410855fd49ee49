"""The command line's messages: one line for what the user can fix, a traceback for the rest.

Each command here fails before any training (a bad flag, or a stage replaced by one that
stops at once), so the file runs in seconds per command."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs main like `python -m fedllava.main`, with stage 'federate' replaced by STOP.
_DRIVER = """
import signal, sys, types
import jax
from absl import app, flags
from fedllava import main
STOP = sys.argv.pop(1)
def stop(config, workdir, init=None, **kwargs):
  if STOP == "sigint":
    # Ctrl-C, in the main thread. A harness started as a background job without job control
    # (`(cmd &)` in a script) passes SIGINT down as ignored, and Python then installs no
    # handler: restore the one a terminal's process has, as a user's run does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.raise_signal(signal.SIGINT)
  raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")
main.STAGES["federate"] = types.SimpleNamespace(run=stop)
flags.mark_flags_as_required(["config"])
app.run(main.main, flags_parser=main.parse_flags)
"""


def _cli(*args, driver=None):
  cmd = (
    [sys.executable, "-c", _DRIVER, driver] if driver else [sys.executable, "-m", "fedllava.main"]
  )
  return subprocess.run(
    [*cmd, *args],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_a_misspelt_field_is_one_line_with_the_suggestion(tmp_path):
  out = _cli(
    "--config=configs/digits_lt.py", "--config.fl.lerning_rate=0.1", f"--workdir={tmp_path}"
  )
  assert out.returncode == 1
  assert out.stderr.strip() == (
    "fedllava: --config.fl.lerning_rate: the config has no field 'lerning_rate'. "
    "Did you mean 'learning_rate'?"
  )


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n  pass\n")
  out = _cli(f"--config={bad}", f"--workdir={tmp_path / 'wd'}")
  assert out.returncode == 1
  assert out.stderr.strip() == (
    f"fedllava: cannot load --config: {bad}, line 1: invalid syntax: 'def get_config(:'; "
    "fix the config file."
  )
  assert not (tmp_path / "wd").exists()


def test_ctrl_c_says_where_it_stopped_and_that_rerunning_resumes(tmp_path):
  wd = tmp_path / "wd"
  args = ("--config=configs/digits_lt.py:tiny", "--config.stages=federate", f"--workdir={wd}")
  out = _cli(*args, driver="sigint")
  assert out.returncode == 130
  assert out.stderr.strip() == (
    f"fedllava: interrupted in stage federate (no checkpoint of it yet; {wd / 'federate'}); "
    "rerun the same command to resume."
  )


def test_an_xla_runtime_error_keeps_its_traceback(tmp_path):
  args = ("--config=configs/digits_lt.py:tiny", "--config.stages=federate", f"--workdir={tmp_path}")
  out = _cli(*args, driver="oom")
  assert out.returncode == 1
  assert "Traceback (most recent call last)" in out.stderr
  assert out.stderr.strip().endswith(
    "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB"
  )
