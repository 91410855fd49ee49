"""Atomic file writes: nothing a run has written is ever left half-written.

Every file a run writes outside orbax (config, reports, metrics, figures) goes through
``atomic_open``: a temporary file in the same directory, flushed and fsynced, then renamed over
the target with ``os.replace`` (atomic on POSIX). A crash leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file that replaces ``path`` when the ``with`` block ends without error.

  Args:
    path: the final file; its directory is created if missing.
    mode: ``"w"`` (UTF-8 text) or ``"wb"``.
  Yields:
    The open temporary file.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
  directory = os.path.dirname(os.path.abspath(os.fspath(path)))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    kwargs = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically."""
  with atomic_open(path, "w") as f:
    f.write(text)
