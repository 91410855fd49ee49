"""Atomic file writes, and one run per workdir.

Every file a run writes outside orbax (config, reports, metrics, figures) goes through
``atomic_open``: a temporary file (``.tmp-fedllava-*``, a name only this program uses) in the
same directory, flushed and fsynced, then renamed over the target with ``os.replace`` (atomic on
POSIX). A crash leaves the old file or the new one, and at worst a temporary, which
``clean_stale_temporaries`` removes from the workdir and its stage directories (nothing else:
``--workdir`` may be a folder that holds the user's own files). A full disk while writing is
one ``DiskFullError`` naming the file.

``workdir_lock`` holds ``<workdir>/.lock`` (JSON ``{pid, host, started}``) for the run, so a
second run in the same workdir stops with a clear message instead of interleaving writes.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from typing import IO, Callable, Iterator, Sequence

from fedllava import errors

LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-fedllava-"
# The directories a run writes its files in, below the workdir: main.STAGES and the side-by-side
# baseline (test_fileio checks they agree).
STAGE_DIRS = ("annotate", "pretrain", "federate", "federate_plain", "align")


def is_disk_full(e: BaseException | None) -> bool:
  """Whether ``e`` or an exception it was raised from or during is "no space left on device"."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(e) or "ENOSPC" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


class DiskFullError(errors.WorkdirError):
  """No space left while writing ``path``; the message says to free space and rerun."""

  def __init__(self, path: str):
    self.path = path
    super().__init__(disk_full_message(path))


def disk_full_message(path: str) -> str:
  """One line: the file or directory, the free space left there, and the fix."""
  where = os.path.abspath(os.fspath(path))
  probe = where
  while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe)
  try:
    free = f"{shutil.disk_usage(probe or '/').free / 2**20:.1f} MiB free"
  except OSError:
    free = "free space unknown"
  return (
    f"the disk is full writing {where} ({free}); free space on that filesystem (or use a "
    "--workdir on a larger one) and rerun the same command to resume"
  )


def check_workdir(workdir: str) -> None:
  """Refuses, writing nothing, a workdir that is a file or cannot be written.

  Raises:
    errors.WorkdirError: naming the path and the fix.
  """
  path = os.path.abspath(os.fspath(workdir))
  probe = path
  while not os.path.lexists(probe):  # the nearest existing ancestor is where makedirs starts
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    what = "is a file" if probe == path else f"is below {probe}, which is a file"
    raise errors.WorkdirError(f"--workdir {path} {what}; pass a directory (new or existing).")
  if not os.access(probe, os.W_OK | os.X_OK):
    what = "is" if probe == path else f"would be created in {probe}, which is"
    raise errors.WorkdirError(
      f"--workdir {path} {what} not writable (permission denied); pass a --workdir you can "
      "write, or fix its permissions."
    )


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file that replaces ``path`` when the ``with`` block ends without error.

  Args:
    path: the final file; its directory is created if missing.
    mode: ``"w"`` (UTF-8 text) or ``"wb"``.
  Yields:
    The open temporary file.
  Raises:
    DiskFullError: no space left on the device; the old file is kept.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
  directory = os.path.dirname(os.path.abspath(os.fspath(path)))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX)
  try:
    kwargs = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      raise DiskFullError(os.fspath(path)) from e
    raise


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically."""
  with atomic_open(path, "w") as f:
    f.write(text)


def clean_stale_temporaries(workdir: str, subdirs: Sequence[str] = STAGE_DIRS) -> list[str]:
  """Removes the ``.tmp-fedllava-*`` files that ``atomic_open`` of a killed process left.

  Looks only in ``workdir`` and its ``subdirs`` (the stage directories), not recursively: a
  user's own folders under ``--workdir``, and files named ``.tmp-*`` by anyone else, are never
  touched. Call it only while holding ``workdir_lock`` on the workdir: a live run's temporary
  is a write in progress, and the lock is what proves no other run is writing there.

  Returns:
    The paths removed, sorted.
  """
  removed = []
  for d in [workdir, *(os.path.join(workdir, s) for s in subdirs)]:
    if not os.path.isdir(d):
      continue
    for name in os.listdir(d):
      path = os.path.join(d, name)
      if name.startswith(TMP_PREFIX) and os.path.isfile(path) and not os.path.islink(path):
        try:
          os.remove(path)
        except FileNotFoundError:
          continue
        removed.append(path)
  return sorted(removed)


def set_aside(src: str, dest_dir: str, name: str) -> str:
  """Moves ``src`` (a file or a directory) to ``dest_dir/<name>-<UTC time>[-n]``; never deletes.

  Used for what must be kept but not reused: a damaged checkpoint step, a stale stage directory,
  a damaged cache file. Returns the new path.
  """
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  os.makedirs(dest_dir, exist_ok=True)
  dest, n = os.path.join(dest_dir, f"{name}-{stamp}"), 1
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(dest_dir, f"{name}-{stamp}-{n}")
  os.rename(src, dest)
  return dest


class WorkdirLockedError(errors.UserError, RuntimeError):
  """Another run holds the workdir (or its lock cannot be checked); the message says what to do."""


def _read_lock(path: str) -> dict | None:
  """The holder recorded in a lock file; None if the file is gone; {} if unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _write_new(directory: str, info: dict) -> str:
  fd, tmp = tempfile.mkstemp(
    dir=directory, prefix=LOCK_FILE + ".new-"
  )  # not TMP_PREFIX: see clean_stale_temporaries
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(info, f)
    f.flush()
    os.fsync(f.fileno())
  os.chmod(tmp, 0o644)
  return tmp


def _create_exclusive(path: str, info: dict) -> bool:
  """Creates ``path`` holding ``info`` only if it does not exist; never leaves it half-written."""
  tmp = _write_new(os.path.dirname(path), info)
  try:
    os.link(tmp, path)  # atomic, fails if path exists; the file is complete when it appears
    return True
  except FileExistsError:
    return False
  except OSError as e:  # a filesystem without hard links: O_CREAT | O_EXCL
    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
      raise
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(info, f)
      f.flush()
      os.fsync(f.fileno())
    return True
  finally:
    os.remove(tmp)


@contextlib.contextmanager
def _directory_guard(directory: str) -> Iterator[None]:
  """Serialises lock take-overs between processes of this host (flock on the directory)."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a filesystem without flock: the take-over is then best effort
      pass
    yield
  finally:
    os.close(fd)  # releases the flock


def _in_use(workdir: str, path: str, holder: dict) -> WorkdirLockedError:
  return WorkdirLockedError(
    f"workdir {workdir} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
    f"since {holder.get('started')}; wait for it, or if that run is dead remove {path}"
  )


@contextlib.contextmanager
def workdir_lock(workdir: str, log: Callable[[str], None] = print) -> Iterator[dict]:
  """Holds ``<workdir>/.lock`` for the ``with`` block: one run per workdir.

  The lock file is created exclusively and holds ``{"pid", "host", "started"}``. A lock left by
  a dead process on this host (``os.kill(pid, 0)`` finds no such pid) is taken over atomically,
  with one line through ``log``; a lock held by a live process, by another host (whose pids
  cannot be checked), or that cannot be read, is refused. The lock is removed when the block
  ends, also on an exception.

  Creates ``workdir`` if missing. Yields the lock record.

  Raises:
    WorkdirLockedError: the workdir is in use; the message names the holder and the fix.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  me = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  with _directory_guard(workdir):
    while not _create_exclusive(path, me):
      holder = _read_lock(path)
      if holder is None:  # released meanwhile
        continue
      if not holder:
        raise WorkdirLockedError(
          f"workdir {workdir} has a lock file that cannot be read ({path}); if no run is "
          f"using {workdir}, remove {path}"
        )
      pid = holder.get("pid")
      if holder.get("host") != me["host"] or not isinstance(pid, int) or _pid_alive(pid):
        raise _in_use(workdir, path, holder)
      # A dead process of this host: replace its lock in one step, so the path never
      # disappears for a run of another host (which does not take the guard's flock).
      tmp = _write_new(workdir, me)
      os.replace(tmp, path)
      log(
        f"[lock] took over {path}: pid {pid} on this host ({me['host']}), which locked it at "
        f"{holder.get('started')}, is no longer running"
      )
      break
  try:
    yield dict(me)
  finally:
    if _read_lock(path) == me:
      os.remove(path)
