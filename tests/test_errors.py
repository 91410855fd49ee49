"""main.main prints a UserError as one line and keeps every other exception's traceback."""

import os

import jax
import ml_collections
import pytest

from fedllava import checkpoint, errors, fileio, main


@pytest.mark.parametrize(
  "cls, builtin",
  [
    (errors.ConfigError, ValueError),
    (errors.MissingInputError, FileNotFoundError),
    (errors.DivergedError, FloatingPointError),
    (errors.DamagedFileError, ValueError),
    (checkpoint.CheckpointError, RuntimeError),
    (fileio.WorkdirLockedError, RuntimeError),
  ],
)
def test_user_errors_are_also_the_builtin_they_replace(cls, builtin):
  assert issubclass(cls, errors.UserError) and issubclass(cls, builtin)


def _flag(value):
  return type("Flag", (), {"value": value})()


@pytest.fixture
def call_main(monkeypatch, tmp_path):
  """main.main with its flags set and ``run`` replaced by ``raiser``: returns SystemExit or None."""

  def call(raiser, traceback=False):
    config = ml_collections.ConfigDict({"name": "x", "workdir": ""})
    monkeypatch.setattr(main, "_CONFIG", _flag(config))
    monkeypatch.setattr(main, "_WORKDIR", _flag(str(tmp_path / "wd")))
    monkeypatch.setattr(main, "_TRACEBACK", _flag(traceback))
    monkeypatch.setattr(main, "run", lambda config, workdir: raiser())
    with pytest.raises(SystemExit) as e:
      main.main([])
    return e.value  # (an exception that main lets through propagates out of call)

  return call


def _raise(e):
  def raiser():
    raise e

  return raiser


@pytest.mark.parametrize(
  "exc",
  [
    jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB"),
    RuntimeError("a bug"),
    ValueError("a library's ValueError"),
    FileNotFoundError("an internal file"),
  ],
)
def test_program_errors_keep_their_traceback(call_main, exc):
  with pytest.raises(type(exc)) as e:  # propagates: Python prints the traceback, status 1
    call_main(_raise(exc))
  assert e.value is exc


def test_a_config_error_is_one_line(call_main, capsys):
  out = call_main(_raise(errors.ConfigError("config.fl.rounds=0 must be >= 1.")))
  err = capsys.readouterr().err
  assert out.code == 1
  assert err.strip().splitlines() == [
    "fedllava: ConfigError: config.fl.rounds=0 must be >= 1.",
    "(--traceback shows where)",
  ]


def test_traceback_flag_reraises_a_user_error(call_main):
  with pytest.raises(errors.ConfigError):
    call_main(_raise(errors.ConfigError("bad")), traceback=True)


def test_a_damaged_config_json_is_named_with_the_fix(tmp_path):
  config = ml_collections.ConfigDict({"seed": 1})
  for garbage in (b"\x00\xff\xfe binary", b'{"seed": 1', b"[1, 2]"):
    (tmp_path / "config.json").write_bytes(garbage)
    with pytest.raises(errors.DamagedFileError) as e:
      checkpoint.check_config(str(tmp_path), config, has_progress=True)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'config.json'} is damaged (")
    assert "move it away and rerun" in message and "new --workdir" in message


def test_a_full_disk_is_one_line_with_the_path_and_the_fix(
  call_main, capsys, monkeypatch, tmp_path
):
  import errno
  import os

  target = tmp_path / "wd" / "report.json"

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  def raiser():
    monkeypatch.setattr(os, "fsync", full)
    fileio.atomic_write_text(str(target), "x")

  out = call_main(raiser)
  err = capsys.readouterr().err
  assert out.code == 1
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert err.startswith(f"fedllava: the disk is full writing {target} (")
  assert "free space on that filesystem" in err and "rerun the same command to resume" in err
  assert not target.exists() and os.listdir(target.parent) == []


def test_an_uncached_hub_teacher_is_one_message_before_anything_is_written(tmp_path):
  from conftest import tiny_digits

  assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: no network in the tests
  name = "nobody-fedllava/not-a-cached-model"
  cases = [
    (
      "config.align.teacher",
      {"stages": "federate,align", "align.beta": 0.5, "align.teacher": name},
    ),
    ("config.pretrain.teacher", {"stages": "annotate,pretrain,federate", "pretrain.teacher": name}),
  ]
  for field, overrides in cases:
    with pytest.raises(errors.MissingInputError) as e:
      main.validate(tiny_digits(1, **overrides))
    message = str(e.value)
    assert message.startswith(f"{field}={name!r} is not in the Hugging Face cache (")
    assert f"huggingface-cli download {name}" in message and "local checkpoint directory" in message
  assert os.listdir(tmp_path) == []
