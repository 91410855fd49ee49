"""Teachers named by a Hugging Face hub name: is a copy there before the run starts?"""

from __future__ import annotations

import os

from fedllava import errors
from fedllava.data.sources import reachable

HUB_HOST = "huggingface.co"


def check_hub_teacher(name: str, field: str) -> None:
  """Stops, before anything is written, when ``name`` (a hub name, ``owner/model``) has no copy
  in the Hugging Face cache and cannot be downloaded (``HF_HUB_OFFLINE=1``, or no answer from
  the hub). A local directory, or a cached or downloadable name, passes.

  Raises:
    errors.MissingInputError: naming ``field``, the cache searched and the two fixes.
  """
  if os.path.isdir(name):
    return
  from huggingface_hub import constants, snapshot_download

  try:
    snapshot_download(name, local_files_only=True)
    return
  except Exception:  # noqa: BLE001 - not cached (or a partial copy): decided below
    pass
  offline = constants.HF_HUB_OFFLINE
  if not offline and reachable(HUB_HOST):
    return
  why = "HF_HUB_OFFLINE=1" if offline else f"{HUB_HOST} cannot be reached"
  raise errors.MissingInputError(
    f"{field}={name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
    f"{why}. On a machine with network run `huggingface-cli download {name}` and copy its "
    f"cache folder here (or set HF_HOME to it), or set {field} to a local checkpoint directory."
  )
