"""LLaVA-format image-text data: read and validate the JSON (the grain pipeline that batches it is
``llava_loader.py``).

Format (LLaVA-CC3M-Pretrain-595K, LLaVA-1.5's ``blip_laion_cc_sbu_558k.json``, the instruction sets
and the annotations Stage 1 writes): a JSON list of
``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}`` with ``<image>`` in
the first human turn; ``image`` is a path relative to an image folder.

``read_conversations`` validates every entry up front (JSON structure, ``<image>`` placement,
non-empty answers, path confinement, file existence, and by default a full decode), so nothing
fails midway; bad entries are either skipped and reported with their ids, or refused at once.

JSON only: nothing read from disk is ever unpickled.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

from fedllava.data import conversation

BAD_KINDS = (
  "malformed",
  "path_escapes_root",
  "missing_image",
  "unreadable_image",
  "no_image_token",
  "empty_answer",
)
_FIRST_IDS = 5  # ids quoted per kind in messages

log = logging.getLogger(__name__)


def format_report(report: Dict[str, List[str]], first: int = _FIRST_IDS) -> str:
  """One line: ``"missing_image: 2 (a, b); empty_answer: 1 (c)"`` (the first ``first`` ids)."""
  parts = []
  for kind, ids in report.items():
    if ids:
      more = ", ..." if len(ids) > first else ""
      parts.append(f"{kind}: {len(ids)} ({', '.join(ids[:first])}{more})")
  return "; ".join(parts) or "none"


def _check_structure(entry) -> Optional[str]:
  """The bad kind of an entry's JSON structure and text, or None (no file access)."""
  if not isinstance(entry, dict) or not isinstance(entry.get("id"), (str, int)):
    return "malformed"
  image, conv = entry.get("image"), entry.get("conversations")
  if not isinstance(image, str) or not image or "\x00" in image:
    return "malformed"  # text-only entries are not image-text pairs
  if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
    return "malformed"
  for j, turn in enumerate(conv):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      return "malformed"
    if turn.get("from") != ("human", "gpt")[j % 2]:
      return "malformed"  # human, gpt, human, gpt, ...
  if conversation.IMAGE not in conv[0]["value"]:
    return "no_image_token"
  if sum(t["value"].count(conversation.IMAGE) for t in conv) != 1:
    return "malformed"  # one image per entry: a second <image> would have no features
  if any(not t["value"].strip() for t in conv[1::2]):
    return "empty_answer"
  return None


def resolve_image(image_root: str, image: str) -> Optional[str]:
  """The real path of ``image`` under ``image_root``, or None when it escapes the root.

  Refused: absolute paths, ``..`` that leaves the root, and symlinks (of the file or of a folder
  on the way) that point outside it. ``a/../b.png`` stays inside and is accepted.
  """
  if os.path.isabs(image):
    return None
  root = os.path.realpath(image_root)
  lexical = os.path.normpath(os.path.join(root, image))
  real = os.path.realpath(lexical)
  for p in (lexical, real):
    if os.path.commonpath([root, p]) != root:
      return None
  return real


def check_image(path: str, mode: str = "decode") -> bool:
  """Whether Pillow can read ``path``: ``decode`` decodes every pixel (catches truncated files),
  ``open`` reads the header and runs ``verify`` (cheap), ``none`` checks nothing."""
  if mode == "none":
    return True
  from PIL import Image

  try:
    with Image.open(path) as im:
      if mode == "open":
        im.verify()
      else:
        im.convert("RGB").load()
    return True
  except Exception:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
    return False


def read_conversations(
  json_path: str,
  image_root: str,
  bad_examples: str = "skip",
  *,
  check_images: str = "decode",
  num_threads: int = 4,
) -> Tuple[List[dict], Dict[str, List[str]]]:
  """Reads and validates a LLaVA-format JSON file.

  Args:
    json_path: the JSON list of entries.
    image_root: the folder the entries' ``image`` paths are relative to.
    bad_examples: ``"skip"`` drops bad entries (and logs the report); ``"fail"`` raises one
      ValueError naming every kind found and its first ids (``config.pretrain.bad_examples``).
    check_images: ``"decode"`` (default: every image decoded once, in ``num_threads`` threads;
      ~ms per CC3M image), ``"open"`` (header + ``verify`` only), or ``"none"``. Whatever is
      chosen, a file that fails to decode later never stops the loader
      (``llava_loader.make_loader``).
    num_threads: threads for the image check.

  Returns:
    ``(records, report)``: the valid entries in file order (``id`` as a string, other fields as
    read), and ``{kind: [ids]}`` for every kind in ``BAD_KINDS`` (empty lists when clean).
    Entries without a usable id are named ``"#<position in the list>"``. Kinds, the first that
    applies: ``malformed`` (not a dict; no id; no image path; turns not alternating human, gpt
    and ending with gpt; more than one ``<image>``), ``no_image_token`` (not in the first human
    turn), ``empty_answer`` (a blank gpt turn), ``path_escapes_root``, ``missing_image``,
    ``unreadable_image``.
  """
  if bad_examples not in ("skip", "fail"):
    raise ValueError(f"bad_examples must be 'skip' or 'fail', got {bad_examples!r}")
  if check_images not in ("decode", "open", "none"):
    raise ValueError(f"check_images must be 'decode', 'open' or 'none', got {check_images!r}")
  with open(json_path, encoding="utf-8") as f:
    try:
      entries = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{json_path} is not valid JSON: {e}") from e
  if not isinstance(entries, list):
    raise ValueError(f"{json_path}: expected a JSON list of entries, got {type(entries).__name__}")
  report: Dict[str, List[str]] = {k: [] for k in BAD_KINDS}
  kinds: List[Optional[str]] = []
  paths: List[Optional[str]] = []
  for entry in entries:
    kind, path = _check_structure(entry), None
    if kind is None:
      path = resolve_image(image_root, entry["image"])
      kind = "path_escapes_root" if path is None else None
    if kind is None and not os.path.isfile(path):
      kind = "missing_image"
    kinds.append(kind)
    paths.append(path if kind is None else None)
  todo = [i for i, p in enumerate(paths) if p is not None]
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    ok = list(pool.map(lambda i: check_image(paths[i], check_images), todo))
  for i, good in zip(todo, ok):
    if not good:
      kinds[i] = "unreadable_image"
  records = []
  for i, (entry, kind) in enumerate(zip(entries, kinds)):
    has_id = isinstance(entry, dict) and isinstance(entry.get("id"), (str, int))
    rid = str(entry["id"]) if has_id else f"#{i}"
    if kind is None:
      records.append({**entry, "id": rid})
    else:
      report[kind].append(rid)
  n_bad = len(entries) - len(records)
  if n_bad and bad_examples == "fail":
    raise ValueError(
      f"{json_path}: {n_bad} of {len(entries)} entries are bad: {format_report(report)} "
      "(set bad_examples='skip' to drop them)"
    )
  if n_bad:
    log.warning(
      "%s: skipped %d of %d entries: %s", json_path, n_bad, len(entries), format_report(report)
    )
  return records, report
