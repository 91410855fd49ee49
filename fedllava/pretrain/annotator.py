"""The annotation engine: the MLLM writes text for a folder of unlabeled images (paper Sec. 3.1).

The stage that runs it (teacher, folders, report) is ``annotate.py``.

For every image and every requested kind ("conversation", "detailed_description",
"complex_reasoning"; questions in ``prompts.py``), our Flax LLaVA answers one seeded question and the
pair is saved in LLaVA's JSON format, which ``fedllava.data.llava.read_conversations`` reads:

    [{"id": "sub/cat_01", "image": "sub/cat_01.png", "kind": "conversation",
      "conversations": [{"from": "human", "value": "<image>\\n<question>"},
                        {"from": "gpt", "value": "<answer>"}]}, ...]

``id`` is the image's path relative to the folder without its extension; one image has one record
per kind, so (id, kind) is the record's key. Records are sorted by (image path, kind order).

Fixed shapes: every generate call gets ``batch_size`` prompts left-padded to ``prompt_len`` tokens
(a short last batch is filled with copies of its first row, whose answers are dropped), so the
first batch compiles and no later one does.

Resuming: after each batch its records are appended, flushed and fsynced, to
``<out_json>.partial.jsonl``; a torn last line (a crash mid-write) is discarded on restart. A rerun
skips every (id, kind) found there or in an existing ``out_json`` and, at the end, writes
``out_json`` atomically with all records and removes the partial file. Greedy decoding gives the
same answers resumed or not; so does sampling, whose key is ``fold_in(PRNGKey(seed), i)`` with ``i``
the batch's first position in the full (image, kind) list, as long as ``batch_size`` is unchanged.
Settings other than the (id, kind) set are not checked on resume.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
import tqdm
from PIL import Image

from fedllava import errors
from fedllava.data import conversation as conv_lib
from fedllava.data.llava import read_conversations
from fedllava.fileio import atomic_write_text
from fedllava.models import clip as clip_lib
from fedllava.pretrain import prompts

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
log = logging.getLogger(__name__)
# Pillow's errors for a file it cannot decode; DecompressionBombError is not an OSError.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def list_images(image_dir: str) -> Tuple[List[Tuple[str, str]], List[str]]:
  """The folder's images as sorted ``(id, relative path)`` pairs, and the files left out because
  they resolve outside the folder (symlinks). Raises if two images share an id."""
  root = os.path.realpath(image_dir)
  if not os.path.isdir(root):
    raise errors.MissingInputError(f"image folder {image_dir!r} does not exist")
  found, outside = [], []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in filenames:
      if not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
      if os.path.commonpath([root, os.path.realpath(os.path.join(root, rel))]) != root:
        outside.append(rel)
        continue
      found.append(rel)
  found.sort()
  pairs, seen = [], {}
  for rel in found:
    image_id = os.path.splitext(rel)[0]
    if image_id in seen:
      raise ValueError(f"images {seen[image_id]!r} and {rel!r} share the id {image_id!r}")
    seen[image_id] = rel
    pairs.append((image_id, rel))
  return pairs, sorted(outside)


def load_image(path: str, image_size: int) -> np.ndarray:
  """uint8 ``[S, S, 3]``: CLIPImageProcessor's resize (short side to S, PIL bicubic) and centre crop."""
  with Image.open(path) as im:
    im = im.convert("RGB")
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if w <= h else (new_long, image_size)
    if size != (w, h):
      im = im.resize(size, Image.BICUBIC)
    x = np.asarray(im, np.uint8)
  top, left = (x.shape[0] - image_size) // 2, (x.shape[1] - image_size) // 2
  return x[top : top + image_size, left : left + image_size]


@functools.partial(jax.jit, static_argnums=0)
def _pixel_features(model, params, images_uint8):
  """CLIP features of uint8 NHWC images (normalisation in ``clip.preprocess``; no resize here)."""
  pixels = clip_lib.preprocess(images_uint8, model.config.vision_config.image_size)
  return model.image_features(params, pixels, True)


def prompt_ids(question, tokenizer, template, image_token_id, num_image_tokens) -> List[int]:
  """Token ids of the generation prompt "<system> USER: <image>\\n<question> ASSISTANT:"."""
  text = conv_lib.generation_prompt(question, template)
  return conv_lib.tokenize_with_image(text, tokenizer, image_token_id, num_image_tokens)[0]


def decode_answer(tokenizer, tokens, stop_token_ids: Sequence[int]) -> Tuple[str, bool]:
  """(answer text, whether a stop token ended it): tokens up to the first stop token, decoded
  without special tokens and stripped."""
  tokens = [int(t) for t in tokens]
  cut = next((i for i, t in enumerate(tokens) if t in set(stop_token_ids)), None)
  kept = tokens if cut is None else tokens[:cut]
  return tokenizer.decode(kept, skip_special_tokens=True).strip(), cut is not None


def _record(image_id, rel, kind, question, answer) -> dict:
  return {
    "id": image_id,
    "image": rel,
    "kind": kind,
    "conversations": [
      {"from": "human", "value": conv_lib.IMAGE + "\n" + question},
      {"from": "gpt", "value": answer},
    ],
  }


def _read_done(out_json: str, partial: str) -> Dict[Tuple[str, str], dict]:
  """Records already written, by (id, kind): ``out_json`` first, then the partial file's complete
  lines. A torn partial file is rewritten (atomically) without its broken lines."""
  done = {}
  if os.path.exists(out_json):
    with open(out_json, encoding="utf-8") as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError as e:
        raise errors.ConfigError(
          f"{out_json} exists but is not JSON ({e}); move it away to re-annotate"
        )
    if not isinstance(old, list):
      raise errors.ConfigError(f"{out_json} exists but is not a JSON list of LLaVA records")
    done.update({(r["id"], r["kind"]): r for r in old})
  if os.path.exists(partial):
    good, torn = [], 0
    with open(partial, encoding="utf-8") as f:
      for line in f:
        try:
          rec = json.loads(line)
          done[(rec["id"], rec["kind"])] = rec
          good.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
          torn += 1
    if torn:
      log.warning("%s: dropped %d incomplete line(s) from an interrupted run", partial, torn)
      atomic_write_text(partial, "".join(good))
  return done


def _append(partial: str, records: Sequence[dict]) -> None:
  with open(partial, "a", encoding="utf-8") as f:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def annotate_folder(
  model,
  params,
  tokenizer,
  image_dir: str,
  out_json: str,
  *,
  kinds: Sequence[str] = prompts.KINDS,
  batch_size: int,
  max_new_tokens: int,
  prompt_len: int,
  seed: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  template: str = "vicuna_v1",
  image_token_id: Optional[int] = None,
) -> dict:
  """Annotates every image in ``image_dir`` with one answer per kind and writes ``out_json``.

  Args:
    model: a ``fedllava.models.llava.LlavaModel``.
    params: its parameters.
    tokenizer: the model's Hugging Face tokenizer (its ``eos_token_id`` stops an answer).
    image_dir: folder of .png/.jpg/.jpeg images, searched recursively; files resolving outside it
      are left out (and listed in the report).
    out_json: the LLaVA-format JSON list to write (see the module docstring).
    kinds: which of ``prompts.KINDS`` to write.
    batch_size: prompts per generate call (every call has this many rows).
    max_new_tokens: answer length limit; an answer that reaches it without a stop token is counted
      in the report's ``truncated``.
    prompt_len: every prompt is left-padded to this many tokens; a longer prompt raises before any
      image is processed.
    seed: chooses the questions (``prompts.choose_question``) and the sampling keys.
    temperature: 0 for greedy decoding, otherwise sampling at this temperature ...
    top_p: ... restricted to the nucleus of this mass.
    template: conversation template of the prompt (``fedllava.data.conversation.TEMPLATES``).
    image_token_id: id of the image placeholder in the prompt; the model's
      ``config.image_token_index`` when None.

  Returns:
    A report: ``records`` and ``kinds`` (records in ``out_json``, per kind), ``generated`` (per kind,
    this run), ``skipped_done`` ((image, kind) pairs found already written), ``images``,
    ``images_per_s`` and ``prompts_per_s`` (this run), ``empty`` (``[{"id", "kind"}]`` whose answer
    is empty: written, but the loader drops them), ``truncated``, ``unreadable`` and
    ``outside_folder`` (image paths left out), ``loaded`` and ``bad`` (what
    ``read_conversations(out_json, image_dir, bad_examples="skip")`` returned) and ``seconds``.
  """
  kinds = prompts.check_kinds(kinds)
  if batch_size < 1 or max_new_tokens < 1:
    raise ValueError(
      f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}"
    )
  max_pos = model.config.text_config.max_position_embeddings
  if prompt_len + max_new_tokens > max_pos:
    raise ValueError(
      f"prompt_len + max_new_tokens = {prompt_len + max_new_tokens} exceeds the LLM's "
      f"max_position_embeddings ({max_pos})"
    )
  image_token_id = model.image_token_index if image_token_id is None else int(image_token_id)
  n_img_tok = model.num_image_tokens
  ids_of = functools.lru_cache(maxsize=None)(
    lambda q: prompt_ids(q, tokenizer, template, image_token_id, n_img_tok)
  )
  longest = max((len(ids_of(q)), q) for k in kinds for q in prompts.QUESTIONS[k])
  if longest[0] > prompt_len:
    raise ValueError(
      f"prompt_len={prompt_len} is too short: the prompt for {longest[1]!r} has {longest[0]} tokens "
      f"({n_img_tok} of them image tokens) in template {template!r}"
    )
  stops = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
  pad_id = tokenizer.pad_token_id
  pad_id = int(model.config.text_config.pad_token_id or 0) if pad_id is None else int(pad_id)
  image_size = model.config.vision_config.image_size

  start = time.perf_counter()
  images, outside = list_images(image_dir)
  partial = os.fspath(out_json) + ".partial.jsonl"
  done = _read_done(out_json, partial)
  work = [(img, rel, k) for img, rel in images for k in kinds]
  todo = [(i, w) for i, w in enumerate(work) if (w[0], w[2]) not in done]
  rows_left: Dict[str, int] = {}
  for _, (img, _, _) in todo:
    rows_left[img] = rows_left.get(img, 0) + 1

  generated = {k: 0 for k in kinds}
  empty, unreadable, truncated = [], [], 0
  bar = tqdm.tqdm(total=len(rows_left), unit="img", desc="annotate", dynamic_ncols=True)
  cached = (None, None)  # the last image read: consecutive rows are the kinds of one image
  for b in range(0, len(todo), batch_size):
    chunk, pixels, rows = todo[b : b + batch_size], [], []
    for _, (img, rel, kind) in chunk:
      if cached[0] != rel:
        try:
          cached = (rel, load_image(os.path.join(image_dir, rel), image_size))
        except _UNREADABLE as e:  # unreadable, not an image, a bomb: skipped, retried next run
          log.warning("skipping %s: %s", rel, e)
          unreadable.append(rel)
          cached = (rel, None)
      if cached[1] is not None:
        question = prompts.choose_question(kind, img, seed)
        rows.append((img, rel, kind, question))
        pixels.append(cached[1])
    if rows:
      ids = [{"input_ids": np.asarray(ids_of(r[3]), np.int32)} for r in rows]
      ids += [ids[0]] * (batch_size - len(rows))
      pixels += [pixels[0]] * (batch_size - len(rows))
      batch = conv_lib.pad_batch(ids, pad_id, side="left", length=prompt_len)
      feats = _pixel_features(model, params, np.stack(pixels))
      rng = None if temperature <= 0 else jax.random.fold_in(jax.random.PRNGKey(seed), chunk[0][0])
      out = model.generate(
        params,
        None,
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens,
        stop_token_ids=stops,
        pad_token_id=pad_id,
        temperature=temperature,
        top_p=top_p,
        rng=rng,
        visual_features=feats,
      )
      out = np.asarray(out)
      records = []
      for (img, rel, kind, question), tokens in zip(rows, out):
        answer, stopped = decode_answer(tokenizer, tokens, stops)
        truncated += not stopped
        if not answer:
          empty.append({"id": img, "kind": kind})
        generated[kind] += 1
        records.append(_record(img, rel, kind, question, answer))
      _append(partial, records)
      done.update({(r["id"], r["kind"]): r for r in records})
    for _, (img, _, _) in chunk:
      rows_left[img] -= 1
      bar.update(rows_left[img] == 0)
  bar.close()
  seconds = time.perf_counter() - start

  order = {k: i for i, k in enumerate(prompts.KINDS)}
  final = sorted(done.values(), key=lambda r: (r["image"], order.get(r["kind"], len(order))))
  atomic_write_text(out_json, json.dumps(final, indent=1, ensure_ascii=False) + "\n")
  if os.path.exists(partial):
    os.remove(partial)
  loaded, bad = read_conversations(out_json, image_dir, bad_examples="skip")
  n_gen = sum(generated.values())
  return {
    "out_json": os.fspath(out_json),
    "records": len(final),
    "kinds": {k: n for k in prompts.KINDS if (n := sum(r["kind"] == k for r in final))},
    "generated": generated,
    "skipped_done": len(work) - len(todo),
    "images": len(images),
    "images_per_s": (n_gen / len(kinds)) / seconds if seconds > 0 else 0.0,
    "prompts_per_s": n_gen / seconds if seconds > 0 else 0.0,
    "empty": empty,
    "truncated": truncated,
    "unreadable": sorted(set(unreadable)),
    "outside_folder": outside,
    "loaded": len(loaded),
    "bad": bad,
    "seconds": seconds,
  }
