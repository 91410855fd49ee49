"""Offline stand-ins for stage 1's inputs: a tiny random llava-hf checkpoint, digits PNGs, captions.

Nothing pretrained can be downloaded offline, so ``config.pretrain.teacher = "random-tiny"`` makes
the stages write (and then load through the real path, ``models/convert.py``) a TINY RANDOM LLaVA:
CLIP 28 px / 14 px patches (4 image tokens of width 16), a 2-layer LLaMA of width 32, and a
word-level tokenizer over the words of the prompts and captions. Its lm_head is scaled up 30x from
N(0, 0.02) so that the frozen random LLM's predictions can be steered through the image tokens at
all (as in ``tests/test_dwp.py``); with the plain 0.02 init every logit is near-uniform.

``config.pretrain.demo`` also writes digits *training* images (never the test split) as PNGs for
the annotation stage, and templated captions ("a photo of the digit seven") for pretraining,
because a random teacher's answers are noise. Everything here checks the mechanics of stage 1
(annotate -> pretrain -> handoff), not the science.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from fedllava import fileio
from fedllava.data import conversation as conv_lib
from fedllava.pretrain import prompts

RANDOM_TINY = "random-tiny"
LABEL = "[demo] MECHANICS CHECK, not science: tiny random LLaVA teacher, templated digit captions"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", conv_lib.IMAGE)  # ids 0..4 (bos 1, eos 2, pad 3)
_SPLIT = r" ?\w+| ?[^\w\s]|\n| "  # LLaMA-like: a space joins the following word
_DONE = "DONE"


def caption(label: int) -> str:
  """The templated pretraining caption of a digit class (a stand-in for an MLLM's caption)."""
  return f"a photo of the digit {DIGIT_NAMES[int(label)]}"


def _texts() -> list[str]:
  out = [t.system for t in conv_lib.TEMPLATES.values()] + ["USER: ASSISTANT: ", " ", "\n"]
  out += [q for qs in prompts.QUESTIONS.values() for q in qs]
  out += [caption(c) for c in range(10)]
  return out


def vocabulary(texts, pre_tokenizer, specials=SPECIALS) -> list[str]:
  """``specials`` then, sorted, every piece ``pre_tokenizer`` cuts from ``texts`` (each text also
  stripped; the image placeholder is a separator, never a word)."""
  words = set()
  for text in texts:
    for piece in text.replace(conv_lib.IMAGE, "|").split("|"):
      words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(piece))
      words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(piece.strip()))
  return list(specials) + sorted(words - set(specials))


def word_level_tokenizer(tokens, pre_tokenizer=None, *, bos: bool = True):
  """A fast word-level tokenizer (LLaMA's special-token layout) over ``tokens`` in id order.

  The one builder of the tiny tokenizers that the demo teacher and the tests use.

  Args:
    tokens: the vocabulary, token ``i`` has id ``i``; it must hold ``<unk>``, ``<s>``, ``</s>``
      (and ``<pad>`` / the image placeholder when present they become the pad and an added
      special token).
    pre_tokenizer: a ``tokenizers`` pre-tokenizer (default: LLaMA-like, a space joins the
      following word).
    bos: prepend ``<s>`` to every encoding, as LLaMA's tokenizer does.
  """
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(tokens)}
  t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizer or pre_tokenizers.Split(Regex(_SPLIT), "isolated")
  if bos:
    t.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
  extra = {}
  if "<pad>" in vocab:
    extra["pad_token"] = "<pad>"
  if conv_lib.IMAGE in vocab:
    extra["additional_special_tokens"] = [conv_lib.IMAGE]
  return PreTrainedTokenizerFast(
    tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
  )


def build_tokenizer():
  """A word-level fast tokenizer over the prompts' and captions' words (+ <image>, <pad>)."""
  from tokenizers import Regex, pre_tokenizers

  pre = pre_tokenizers.Split(Regex(_SPLIT), "isolated")
  return word_level_tokenizer(vocabulary(_texts(), pre), pre)


def build_teacher(seed: int):
  """(transformers LlavaConfig, float32 params, tokenizer) of the tiny random teacher, in memory."""
  from fedllava.models.llava import LlavaModel
  from fedllava.models.llava_configs import llava_config

  tok = build_tokenizer()
  vocab = -(-len(tok) // 64) * 64
  cfg = llava_config("test", vocab_size=vocab, pad_token_id=3, max_position_embeddings=128)
  cfg.image_token_index = SPECIALS.index(conv_lib.IMAGE)
  model = LlavaModel(cfg, dtype=jnp.float32)
  params = jax.device_get(model.init_params(jax.random.PRNGKey(seed)))
  head = params["language_model"]["lm_head"]
  head["kernel"] = 30.0 * np.asarray(head["kernel"])
  return cfg, params, tok


def to_hf_state_dict(params) -> dict:
  """Our parameter tree -> llava-hf (legacy layout) tensors: the inverse of ``convert.map_key``."""
  out = {}

  def walk(node, path):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, path + (k,))
        continue
      v, leaf = np.asarray(v, np.float32), k
      if leaf == "kernel":
        v, leaf = (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T), "weight"
      elif leaf in ("scale", "embedding"):
        leaf = "weight"
      out[".".join(path + (leaf,))] = np.ascontiguousarray(v)

  walk(params, ())
  return out


def write_teacher(directory: str, seed: int) -> str:
  """Writes the tiny random teacher as a llava-hf checkpoint directory (config.json,
  model.safetensors, tokenizer files); a complete one is kept as it is. Returns ``directory``."""
  from safetensors.numpy import save_file

  if os.path.exists(os.path.join(directory, _DONE)):
    return directory
  cfg, params, tok = build_teacher(seed)
  tmp = directory + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  cfg.save_pretrained(tmp)
  save_file(to_hf_state_dict(params), os.path.join(tmp, "model.safetensors"))
  tok.save_pretrained(tmp)
  with open(os.path.join(tmp, _DONE), "w") as f:
    f.write(f"tiny random LLaVA, seed {seed}: {LABEL}\n")
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)
  return directory


def digits_images(n: int):
  """The first ``n`` digits *training* images (uint8 [n, 8, 8, 3]) and their labels."""
  from fedllava.data import sources

  train = sources.load_dataset("digits", "train")
  n = min(int(n), len(train))
  return train.images[:n], train.labels[:n]


def write_images(directory: str, n: int) -> list[tuple[str, int]]:
  """Writes ``digit_XXXX.png`` for the first ``n`` digits training images (atomically each,
  skipping those present). Returns ``[(relative path, label)]``."""
  from PIL import Image

  images, labels = digits_images(n)
  os.makedirs(directory, exist_ok=True)
  out = []
  for i, (img, y) in enumerate(zip(images, labels)):
    rel = f"digit_{i:04d}.png"
    path = os.path.join(directory, rel)
    if not os.path.exists(path):
      with fileio.atomic_open(path, "wb") as f:
        Image.fromarray(np.asarray(img, np.uint8)).save(f, format="PNG")
    out.append((rel, int(y)))
  return out


def caption_records(images: list[tuple[str, int]]) -> list[dict]:
  """One LLaVA-format record per image with its templated caption (kind ``templated_caption``)."""
  return [
    {
      "id": os.path.splitext(rel)[0],
      "image": rel,
      "kind": "templated_caption",
      "conversations": [
        {"from": "human", "value": conv_lib.IMAGE + "\nWhat digit is this?"},
        {"from": "gpt", "value": caption(y)},
      ],
    }
    for rel, y in images
  ]


def write_pretrain_data(path: str, annotations_json: str, images: list[tuple[str, int]]) -> int:
  """The demo's pretraining JSON: the teacher's annotations + the templated captions."""
  with open(annotations_json, encoding="utf-8") as f:
    records = json.load(f)
  records = records + caption_records(images)
  fileio.atomic_write_text(path, json.dumps(records, indent=1) + "\n")
  return len(records)
