"""The grain input pipeline for LLaVA-format records (read and validated by ``llava.py``).

* ``tokenize_record`` renders a record with a template of ``conversation`` (``plain`` for
  pretraining, ``vicuna_v1`` for instruction data) and masks labels as LLaVA does: only the
  assistant's tokens are targets, the rest (and the image tokens) are -100.
* ``make_loader`` builds a grain pipeline (no TensorFlow): shuffle per epoch, decode and resize
  with Pillow, tokenise, and collate fixed-shape batches, in ``worker_count`` processes (0: in the
  calling process) with prefetching. Every batch has the same shapes: sequences are padded to
  ``max_length`` and the last partial batch is filled with placeholder rows marked ``valid=False``.

Nothing read from disk is ever unpickled (grain's worker processes receive this module's own
transform objects, pickled by grain itself).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from fedllava.data import conversation
from fedllava.data.llava import _FIRST_IDS, resolve_image
from fedllava.data.sources import resize_center_crop

# CLIPImageProcessor's image_mean (fedllava.models.clip.CLIP_MEAN), repeated here so that the
# data workers never import JAX: the fill colour of LLaVA-1.5's "pad" aspect-ratio mode.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

log = logging.getLogger(__name__)


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
