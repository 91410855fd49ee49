"""Atomic writes: a failure mid-write leaves the old file as it was, and no temporary file."""

import os

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
