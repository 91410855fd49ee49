"""Atomic writes (a failure mid-write leaves the old file as it was, and no temporary file), the
removal of a killed writer's temporaries, and the one-run-per-workdir lock."""

import json
import os
import socket
import subprocess
import sys

import pytest

from fedllava import fileio


def test_atomic_write_replaces_and_failure_keeps_old(tmp_path):
  path = tmp_path / "sub" / "report.json"
  fileio.atomic_write_text(str(path), "old")
  assert path.read_text() == "old"
  with pytest.raises(RuntimeError):
    with fileio.atomic_open(str(path)) as f:
      f.write("half of the new")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old"
  assert os.listdir(path.parent) == ["report.json"]
  with fileio.atomic_open(str(path), "wb") as f:
    f.write(b"new")
  assert path.read_bytes() == b"new"
  assert oct(path.stat().st_mode & 0o777) == "0o644"
  with pytest.raises(ValueError, match="modes"):
    with fileio.atomic_open(str(path), "a"):
      pass


# --- stale temporaries -------------------------------------------------------------------------

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **kwargs) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, **kwargs)


def test_clean_stale_temporaries_removes_what_a_killed_write_left(tmp_path):
  (tmp_path / "federate").mkdir()
  fileio.atomic_write_text(str(tmp_path / "report.json"), "kept")
  # A process killed inside atomic_open leaves its temporary file behind.
  for target in ("report.json", "federate/metrics.csv"):
    code = (
      "import os; from fedllava import fileio\n"
      f"with fileio.atomic_open({str(tmp_path / target)!r}) as f:\n"
      "  f.write('half'); f.flush(); os._exit(9)\n"
    )
    assert _python(code).wait(timeout=60) == 9
  (tmp_path / "notes.tmp-1").write_text("not ours")
  left = sorted(p.name for p in tmp_path.rglob(".tmp-fedllava-*"))
  assert len(left) == 2
  removed = fileio.clean_stale_temporaries(str(tmp_path))
  assert sorted(os.path.basename(p) for p in removed) == left
  assert not list(tmp_path.rglob(".tmp-*"))
  assert (tmp_path / "report.json").read_text() == "kept"
  assert (tmp_path / "notes.tmp-1").exists()
  assert fileio.clean_stale_temporaries(str(tmp_path)) == []


def test_clean_stale_temporaries_leaves_the_users_files_alone(tmp_path):
  """--workdir may be a folder that holds the user's files: only our temporaries, only where we
  write (the workdir and its stage directories), are removed."""
  mine = tmp_path / ".tmp-mine"
  mine.write_text("the user's")
  deep = tmp_path / "my_data" / "nested"
  deep.mkdir(parents=True)
  (deep / ".tmp-fedllava-x").write_text("looks like ours, but in the user's folder")
  (tmp_path / "align").mkdir()
  stale = [tmp_path / ".tmp-fedllava-abc", tmp_path / "align" / ".tmp-fedllava-def"]
  for p in stale:
    p.write_text("")
  removed = fileio.clean_stale_temporaries(str(tmp_path))
  assert removed == sorted(str(p) for p in stale)
  assert mine.read_text() == "the user's"
  assert (deep / ".tmp-fedllava-x").exists()


def test_stage_dirs_are_the_stage_registry():
  from fedllava import main

  assert set(fileio.STAGE_DIRS) == set(main.STAGES) | {"federate_plain"}


# --- workdir lock ------------------------------------------------------------------------------

_HOLD = (
  "import sys; from fedllava import fileio\n"
  "with fileio.workdir_lock(sys.argv[1]):\n"
  "  print('locked', flush=True); sys.stdin.readline()\n"
)


def _hold(workdir) -> subprocess.Popen:
  p = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(workdir)],
    env=dict(os.environ, PYTHONPATH=_REPO),
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert p.stdout.readline().strip() == "locked"
  return p


def test_second_run_in_workdir_is_refused_until_the_first_ends(tmp_path):
  workdir = tmp_path / "run"
  holder = _hold(workdir)
  try:
    with pytest.raises(fileio.WorkdirLockedError) as info:
      with fileio.workdir_lock(str(workdir)):
        pass
    msg = str(info.value)
    assert f"workdir {workdir} is in use by pid {holder.pid} on host {socket.gethostname()}" in msg
    assert f"wait for it, or if that run is dead remove {workdir / '.lock'}" in msg
    assert isinstance(info.value, RuntimeError)
    assert json.loads((workdir / ".lock").read_text())["pid"] == holder.pid  # left alone
  finally:
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
  assert not (workdir / ".lock").exists()  # released on exit
  with fileio.workdir_lock(str(workdir)) as me:
    assert me["pid"] == os.getpid()
    assert json.loads((workdir / ".lock").read_text()) == me
  assert not (workdir / ".lock").exists()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  holder = _hold(workdir)
  holder.kill()  # SIGKILL: no cleanup, the lock file stays
  holder.wait(timeout=60)
  holder.stdin.close()
  holder.stdout.close()
  assert json.loads((workdir / ".lock").read_text())["pid"] == holder.pid
  lines = []
  with fileio.workdir_lock(str(workdir), log=lines.append) as me:
    assert json.loads((workdir / ".lock").read_text()) == me
  assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "no longer running" in lines[0]
  assert not (workdir / ".lock").exists()
  assert not [n for n in os.listdir(workdir) if n != ".lock"]  # no temporaries left


def test_stale_lock_take_over_has_one_winner(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  dead = _python("pass")
  dead.wait(timeout=60)
  lock = {"pid": dead.pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00"}
  (workdir / ".lock").write_text(json.dumps(lock))
  go, release = tmp_path / "go", tmp_path / "release"
  code = (
    "import os, sys, time; from fedllava import fileio\n"
    f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
    "try:\n"
    f"  with fileio.workdir_lock({str(workdir)!r}, log=lambda s: None):\n"
    "    print('got', flush=True)\n"
    f"    while not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
    "except fileio.WorkdirLockedError:\n"
    "  print('refused', flush=True)\n"
  )
  procs = [_python(code, stdout=subprocess.PIPE) for _ in range(3)]
  go.touch()
  outcomes = [p.stdout.readline().strip() for p in procs]
  release.touch()
  for p in procs:
    assert p.wait(timeout=60) == 0
    p.stdout.close()
  assert sorted(outcomes) == ["got", "refused", "refused"]
  assert not (workdir / ".lock").exists()


def test_lock_of_another_host_or_unreadable_is_refused(tmp_path):
  lock = tmp_path / ".lock"
  lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "T0"}))
  with pytest.raises(fileio.WorkdirLockedError, match="in use by pid 1 on host elsewhere since T0"):
    with fileio.workdir_lock(str(tmp_path)):
      pass
  lock.write_text("{not json")
  with pytest.raises(fileio.WorkdirLockedError, match="cannot be read"):
    with fileio.workdir_lock(str(tmp_path)):
      pass
  assert lock.read_text() == "{not json"


def test_lock_released_on_exception(tmp_path):
  with pytest.raises(KeyError):
    with fileio.workdir_lock(str(tmp_path)):
      assert (tmp_path / ".lock").exists()
      raise KeyError("the run failed")
  assert not (tmp_path / ".lock").exists()


# --- the workdir itself ------------------------------------------------------------------------


def test_a_workdir_that_is_a_file_or_read_only_is_refused_by_name(tmp_path, monkeypatch):
  from fedllava import errors

  afile = tmp_path / "results.txt"
  afile.write_text("the user's")
  with pytest.raises(errors.WorkdirError, match=f"--workdir {afile} is a file; pass a directory"):
    fileio.check_workdir(str(afile))
  below = afile / "run"
  with pytest.raises(
    errors.WorkdirError, match=f"--workdir {below} is below {afile}, which is a file"
  ):
    fileio.check_workdir(str(below))
  fileio.check_workdir(str(tmp_path / "new" / "run"))  # creatable: fine, and nothing written
  assert sorted(os.listdir(tmp_path)) == ["results.txt"]
  # Read-only (root passes a chmod, so the check is what os.access says of a read-only mount).
  real = os.access
  monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
  with pytest.raises(errors.WorkdirError, match=f"--workdir {tmp_path} is not writable"):
    fileio.check_workdir(str(tmp_path))
  with pytest.raises(errors.WorkdirError, match=f"would be created in {tmp_path}, which is not"):
    fileio.check_workdir(str(tmp_path / "new"))


def test_a_full_disk_keeps_the_old_file_and_names_the_new_one(tmp_path, monkeypatch):
  import errno

  path = tmp_path / "report.json"
  fileio.atomic_write_text(str(path), "old")

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(fileio.DiskFullError) as e:
    fileio.atomic_write_text(str(path), "new")
  assert e.value.path == str(path) and fileio.is_disk_full(e.value)
  assert str(e.value).startswith(f"the disk is full writing {path} (")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]
