"""What a user can get wrong: the exceptions ``fedllava.main`` prints as one line.

``main.main`` catches ``UserError`` only: its message names the field or file and the fix, so
the traceback is noise (``--traceback`` shows it). Any other exception (an XLA
``JaxRuntimeError``, a ``ValueError`` of a library, a bug) keeps its traceback.

Each subclass also inherits the builtin that the code raised before it existed, so callers
and tests that catch ``ValueError`` or ``FileNotFoundError`` still do.
"""

from __future__ import annotations


class UserError(Exception):
  """Base: a problem of the input, not of the program; the message says what to do."""


class ConfigError(UserError, ValueError):
  """A config field is invalid, or the workdir holds a different or finished run."""


class MissingInputError(UserError, FileNotFoundError):
  """A data set, teacher or file the config points at is not there (offline included)."""


class DivergedError(UserError, FloatingPointError):
  """Training produced NaN or infinity; the message names the round and the fix."""


class DamagedFileError(UserError, ValueError):
  """A file of the workdir (config.json, metrics.jsonl) cannot be read; it is named."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be written (a file, read-only, or the disk is full)."""
