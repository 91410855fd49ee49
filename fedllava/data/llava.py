"""LLaVA-format image-text data: read and validate, tokenise, and batch with grain.

Format (LLaVA-CC3M-Pretrain-595K, LLaVA-1.5's ``blip_laion_cc_sbu_558k.json``, the instruction sets
and the annotations Stage 1 writes): a JSON list of
``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}`` with ``<image>`` in
the first human turn; ``image`` is a path relative to an image folder.

* ``read_conversations`` validates every entry up front (JSON structure, ``<image>`` placement,
  non-empty answers, path confinement, file existence, and by default a full decode), so nothing
  fails midway; bad entries are either skipped and reported with their ids, or refused at once.
* ``tokenize_record`` renders a record with a template of ``conversation`` (``plain`` for
  pretraining, ``vicuna_v1`` for instruction data) and masks labels as LLaVA does: only the
  assistant's tokens are targets, the rest (and the image tokens) are -100.
* ``make_loader`` builds a grain pipeline (no TensorFlow): shuffle per epoch, decode and resize
  with Pillow, tokenise, and collate fixed-shape batches, in ``worker_count`` processes (0: in the
  calling process) with prefetching. Every batch has the same shapes: sequences are padded to
  ``max_length`` and the last partial batch is filled with placeholder rows marked ``valid=False``.

JSON only: nothing read from disk is ever unpickled (grain's worker processes receive this
module's own transform objects, pickled by grain itself).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from fedllava.data import conversation
from fedllava.data.sources import resize_center_crop

BAD_KINDS = (
  "malformed",
  "path_escapes_root",
  "missing_image",
  "unreadable_image",
  "no_image_token",
  "empty_answer",
)
# CLIPImageProcessor's image_mean (fedllava.models.clip.CLIP_MEAN), repeated here so that the
# data workers never import JAX: the fill colour of LLaVA-1.5's "pad" aspect-ratio mode.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
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
      chosen, a file that fails to decode later never stops the loader (see ``make_loader``).
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


def tokenize_record(
  record: dict,
  tokenizer,
  template: str,
  max_length: int,
  image_token_id: Optional[int] = None,
  num_image_tokens: int = 576,
) -> Dict[str, np.ndarray]:
  """A record's conversation as LLaVA tokenises it, unpadded and truncated to ``max_length``.

  ``<image>`` expands into ``num_image_tokens`` copies of the image token id (llava-hf); labels
  are the ids on assistant tokens (``plain``: the caption and its ``"\\n"``; ``vicuna_v1``: each
  reply and its ``"</s>"``) and -100 elsewhere, image tokens included.

  Returns:
    int32 ``input_ids``, ``labels``, ``attention_mask`` (all ones), each ``[n <= max_length]``.
  """
  out = conversation.tokenize_conversation(
    record["conversations"], tokenizer, template, image_token_id, num_image_tokens, max_length
  )
  out["attention_mask"] = np.ones_like(out["input_ids"])
  return out


def _pil_resize_crop(im, size: int) -> np.ndarray:
  """CLIPImageProcessor's geometry: shortest side to ``size`` (bicubic, long side
  ``int(size * long / short)``), centre crop; uint8 [size, size, 3], equal to its output."""
  from PIL import Image

  w, h = im.size
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  im = im.resize((nw, nh), Image.BICUBIC)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)


def load_image(
  path: str,
  image_size: Optional[int] = None,
  fl_image_size: Optional[int] = None,
  pad_to_square: bool = False,
) -> Dict[str, np.ndarray]:
  """Decodes an image to RGB and returns ``{"images": ..., "fl_images": ...}`` (uint8 HWC).

  ``images``: CLIP's resize and centre crop at ``image_size``, so ``clip.preprocess`` finds it at
  size and its output equals ``CLIPImageProcessor``'s. ``fl_images``: ``resize_center_crop``
  (bilinear, antialiased) at ``fl_image_size`` for the FL backbone. ``pad_to_square``: LLaVA-1.5's
  ``image_aspect_ratio="pad"`` (centred on a CLIP-mean canvas) before either resize.
  """
  from PIL import Image

  with Image.open(path) as f:
    im = f.convert("RGB")
  w, h = im.size
  if pad_to_square and w != h:
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in _CLIP_MEAN))
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    im = canvas
  out = {}
  if image_size:
    out["images"] = _pil_resize_crop(im, image_size)
  if fl_image_size:
    out["fl_images"] = resize_center_crop(np.asarray(im), fl_image_size)
  return out


class _Example:
  """grain map: record -> one tokenised, decoded example (a placeholder if decoding fails)."""

  def __init__(self, image_root, tokenize_args, sizes, pad_to_square, filler):
    self.image_root, self.tokenize_args, self.sizes = image_root, tokenize_args, sizes
    self.pad_to_square, self.filler = pad_to_square, filler

  def __call__(self, record: dict) -> dict:
    path = resolve_image(self.image_root, record["image"])
    try:
      images = load_image(path, *self.sizes, pad_to_square=self.pad_to_square)
    except Exception:  # any Pillow error: this slot becomes a placeholder, reported by the loader
      return {**self.filler, "id": record["id"], "failed": True}
    tokens = tokenize_record(record, *self.tokenize_args)
    return {**tokens, **images, "id": record["id"], "valid": True, "failed": False}


class _Collate:
  """grain batch_fn: examples -> one fixed-shape batch (placeholders fill a partial batch)."""

  def __init__(self, batch_size, max_length, pad_token_id, filler):
    self.batch_size, self.max_length = batch_size, max_length
    self.pad_token_id, self.filler = pad_token_id, filler

  def __call__(self, examples: Sequence[dict]) -> dict:
    examples = list(examples) + [self.filler] * (self.batch_size - len(examples))
    out = conversation.pad_batch(examples, self.pad_token_id, "right", self.max_length)
    for key in ("images", "fl_images"):
      if key in self.filler:
        out[key] = np.stack([e[key] for e in examples])
    out["valid"] = np.array([e["valid"] for e in examples], bool)
    out["_failed"] = np.array([e["failed"] for e in examples], bool)
    out["ids"] = [e["id"] for e in examples]
    return out


class LlavaLoader:
  """An iterable of fixed-shape batches (see ``make_loader``); ``iterate(start)`` resumes."""

  def __init__(self, dataset, num_examples, num_batches, bad_examples, read_options, mp_options):
    self._dataset, self._read, self._mp = dataset, read_options, mp_options
    self.num_examples, self.num_batches, self.bad_examples = num_examples, num_batches, bad_examples
    self.report: Dict[str, List[str]] = {"unreadable_image": []}  # found while iterating

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("an infinite loader (num_epochs=None) has no length")
    return self.num_batches

  def __iter__(self) -> Iterator[dict]:
    return self.iterate(0)

  def iterate(self, start: int = 0) -> Iterator[dict]:
    """Batches from batch number ``start`` on (the same ones a full pass yields there)."""
    ds = self._dataset[start:] if start else self._dataset
    ds = ds.to_iter_dataset(self._read)
    if self._mp is not None:
      from absl import flags

      if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside an absl app: defaults
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(self._mp)
    it = iter(ds)
    try:
      for batch in it:
        failed = [i for i, f in zip(batch["ids"], batch.pop("_failed")) if f]
        new = [i for i in failed if i not in self.report["unreadable_image"]]
        self.report["unreadable_image"] += new
        if failed and self.bad_examples == "fail":
          raise ValueError(f"images failed to decode while loading: ids {', '.join(failed)}")
        if new:
          log.warning("images failed to decode, slots masked (valid=False): %s", ", ".join(new))
        yield batch
    finally:
      if hasattr(it, "close"):
        it.close()  # ends grain's worker processes


def make_loader(
  records: Sequence[dict],
  image_root: str,
  tokenizer,
  *,
  template: str,
  max_length: int,
  batch_size: int,
  image_size: Optional[int],
  num_image_tokens: int,
  seed: int,
  fl_image_size: Optional[int] = None,
  image_token_id: Optional[int] = None,
  shuffle: bool = True,
  num_epochs: Optional[int] = 1,
  worker_count: int = 0,
  prefetch: int = 2,
  read_threads: int = 1,
  pad_to_square: bool = False,
  bad_examples: str = "skip",
) -> LlavaLoader:
  """Fixed-shape batches of LLaVA records through grain (``records`` from ``read_conversations``).

  Each batch (``B = batch_size``, ``L = max_length``):
    ``images`` uint8 [B, image_size, image_size, 3] (CLIP geometry; omitted if image_size is
    None), ``fl_images`` uint8 [B, fl_image_size, fl_image_size, 3] (only if fl_image_size),
    ``input_ids`` int32 [B, L] (right-padded with ``tokenizer.pad_token_id``), ``labels`` int32
    [B, L] (-100 on non-assistant, image and padding tokens), ``attention_mask`` int32 [B, L],
    ``valid`` bool [B], ``ids`` list of B record ids (``""`` for placeholders).
  Placeholder rows (filling the last partial batch, or standing for an image that failed to
  decode) hold BOS + ``num_image_tokens`` image tokens, attended, all labels -100, a black image
  and ``valid=False``: every row carries exactly ``num_image_tokens`` image tokens, as the LLaVA
  model's ``check_image_tokens`` requires, and no attention row is empty.

  Args:
    records: validated records; ``plain`` takes exactly two turns each.
    image_root: the folder the records' image paths are relative to.
    tokenizer: a fast Hugging Face tokenizer with a pad token (pickled into the workers).
    template: ``"plain"`` or ``"vicuna_v1"``.
    max_length: L; longer sequences are truncated (as LLaVA's collator); it must hold the
      template's prefix, the image tokens and at least one more token.
    batch_size: B.
    image_size: the CLIP resolution (336 for LLaVA-1.5), or None.
    num_image_tokens: positions per ``<image>`` (576 for ViT-L/14-336).
    seed: shuffle seed in [0, 2**32); each epoch is shuffled differently (grain folds in the
      epoch). Same seed, same batches, whatever ``worker_count``.
    fl_image_size: the FL backbone's resolution (32), or None.
    image_token_id: defaults to the tokenizer's ``<image>`` id.
    shuffle: False keeps file order.
    num_epochs: passes over the records (epochs run on into each other; only the very last batch
      can be partial); None repeats forever.
    worker_count: grain worker processes (0: in the calling process).
    prefetch: batches buffered (per worker when ``worker_count > 0``).
    read_threads: threads per process producing batches.
    pad_to_square: LLaVA-1.5's ``image_aspect_ratio="pad"``.
    bad_examples: ``"skip"``: an image that fails to decode becomes a placeholder and its id is
      added to ``loader.report["unreadable_image"]``; ``"fail"``: iteration raises ValueError.
  """
  import grain

  if template == "plain":
    wrong = [r["id"] for r in records if len(r["conversations"]) != 2]
    if wrong:
      raise ValueError(
        f"the 'plain' template takes 2 turns; records {wrong[:_FIRST_IDS]} have more"
      )
  if not records:
    raise ValueError("no records to load")
  if not (image_size or fl_image_size):
    raise ValueError("set image_size, fl_image_size, or both")
  if tokenizer.pad_token_id is None:
    raise ValueError("the tokenizer has no pad token (llava-hf's is <pad> = 32001)")
  img = conversation._image_token_id(tokenizer, image_token_id)
  probe = tokenize_record(records[0], tokenizer, template, None, img, num_image_tokens)
  last = int(np.flatnonzero(probe["input_ids"] == img)[-1])
  if max_length < last + 2:
    raise ValueError(
      f"max_length={max_length} cuts the image tokens: the {template!r} template puts the last of "
      f"the {num_image_tokens} image tokens at position {last}; use max_length >= {last + 2}"
    )
  bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  ids = np.asarray(bos + [img] * num_image_tokens, np.int32)
  filler = {"input_ids": ids, "labels": np.full_like(ids, conversation.IGNORE_INDEX)}
  for key, size in (("images", image_size), ("fl_images", fl_image_size)):
    if size:
      filler[key] = np.zeros((size, size, 3), np.uint8)
  filler.update(id="", valid=False, failed=False)

  ds = grain.MapDataset.source(list(records))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  sizes = (image_size, fl_image_size)
  tokenize_args = (tokenizer, template, max_length, img, num_image_tokens)
  ds = ds.map(_Example(image_root, tokenize_args, sizes, pad_to_square, filler))
  ds = ds.batch(
    batch_size, batch_fn=_Collate(batch_size, max_length, tokenizer.pad_token_id, filler)
  )
  n = None if num_epochs is None else len(records) * num_epochs
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, prefetch))
  mp = None
  if worker_count > 0:
    mp = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch)
  num_batches = None if n is None else math.ceil(n / batch_size)
  return LlavaLoader(ds, n, num_batches, bad_examples, read, mp)
