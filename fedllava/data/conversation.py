"""LLaVA conversation templates and label masking (haotian-liu/LLaVA: llava/conversation.py,
llava/train/train.py preprocess_multimodal / preprocess_plain / preprocess_v1, llava/mm_utils.py
tokenizer_image_token), re-implemented.

Templates:
  plain      (LLaVA pretraining): "<image>" + caption + "\n"; only caption + "\n" are in the loss.
  vicuna_v1  (LLaVA-1.5 instruction tuning): system + " " + "USER: <msg> ASSISTANT: <reply></s>" per
             round; the loss covers each assistant reply and its "</s>".
Tokenisation follows `tokenizer_image_token`: the prompt is split at "<image>", each chunk tokenised
with the tokenizer's BOS (kept for the first chunk only), and the image placeholder inserted. llava-hf
models take `num_image_tokens` copies of the `<image>` token id (576 for LLaVA-1.5 at 336 px).

Label masking: LLaVA computes label spans by counting tokens of the rounds with Vicuna/LLaMA-tokenizer
specific corrections (-2, the legacy flag). We mark the same spans by character offsets instead: a
token is a target iff its text overlaps an assistant reply (plus its "</s>") for vicuna_v1, or the
caption (plus "\n") for plain. For LLaMA's tokenizer this gives LLaVA's labels; for any other fast
tokenizer it still masks exactly the non-assistant parts.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IGNORE_INDEX = -100
IMAGE = "<image>"


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  system: str
  roles: Tuple[str, str]
  sep: str
  sep2: Optional[str]
  style: str  # "two" | "plain"


TEMPLATES: Dict[str, Template] = {
  "vicuna_v1": Template(
    "vicuna_v1",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ("USER", "ASSISTANT"),
    " ",
    "</s>",
    "two",
  ),
  "plain": Template("plain", "", ("", ""), "\n", None, "plain"),
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def move_image_to_front(conversation: Sequence[dict]) -> List[dict]:
  """LLaVA's preprocess_multimodal: a turn holding <image> becomes "<image>\\n" + the rest, stripped."""
  out = copy.deepcopy(list(conversation))
  for turn in out:
    if IMAGE in turn["value"]:
      rest = turn["value"].replace(IMAGE, "").strip()
      turn["value"] = (IMAGE + "\n" + rest).strip()
  return out


def render(
  conversation: Sequence[dict], template: str = "vicuna_v1"
) -> Tuple[str, List[Tuple[int, int]]]:
  """Prompt string exactly as LLaVA builds it, and the character spans that are training targets.
  `conversation`: [{"from": "human"|"gpt", "value": str}, ...] (LLaVA's JSON format)."""
  t = get_template(template)
  conv = move_image_to_front(conversation)
  if t.style == "plain":  # preprocess_plain: the human turn is replaced by the bare image token
    if len(conv) != 2 or IMAGE not in conv[0]["value"]:
      raise ValueError(
        "the 'plain' template takes [human turn with <image>, gpt caption] (2 turns), "
        f"got {len(conv)} turns"
      )
    text = IMAGE + conv[1]["value"] + t.sep
    return text, [(len(IMAGE), len(text))]
  roles = {"human": t.roles[0], "gpt": t.roles[1]}
  if conv and roles.get(conv[0]["from"]) != t.roles[0]:
    conv = conv[1:]  # LLaVA skips a first turn that is not from the human
  text, spans = t.system + t.sep, []
  seps = (t.sep, t.sep2)
  for j, turn in enumerate(conv):
    role = roles.get(turn["from"])
    if role != t.roles[j % 2]:
      raise ValueError(f"turn {j} is from {turn['from']!r}; turns must alternate human, gpt, ...")
    text += role + ": "
    start = len(text)
    text += turn["value"] + seps[j % 2]
    if j % 2 == 1:
      spans.append((start, len(text)))
  return text, spans


def generation_prompt(question: str, template: str = "vicuna_v1", with_image: bool = True) -> str:
  """Prompt for asking the model: "... USER: <image>\\n<question> ASSISTANT:" (no reply yet)."""
  t = get_template(template)
  value = (IMAGE + "\n" + question) if with_image else question
  value = move_image_to_front([{"from": "human", "value": value}])[0]["value"]
  if t.style == "plain":
    return IMAGE if with_image else ""
  return t.system + t.sep + t.roles[0] + ": " + value + t.sep + t.roles[1] + ":"


def _image_token_id(tokenizer, image_token_id):
  if image_token_id is not None:
    return int(image_token_id)
  tid = tokenizer.convert_tokens_to_ids(IMAGE)
  if tid is None or tid == tokenizer.unk_token_id:
    raise ValueError("the tokenizer has no <image> token; pass image_token_id")
  return int(tid)


def tokenize_with_image(text: str, tokenizer, image_token_id=None, num_image_tokens: int = 576):
  """tokenizer_image_token with offsets: (ids, char spans [(start, end)] per token; -1 for BOS/image)."""
  img = _image_token_id(tokenizer, image_token_id)
  ids, offsets, pos = [], [], 0
  for c, chunk in enumerate(text.split(IMAGE)):
    if c > 0:
      ids += [img] * num_image_tokens
      offsets += [(-1, -1)] * num_image_tokens
      pos += len(IMAGE)
    enc = tokenizer(chunk, return_offsets_mapping=True)
    cids, coffs = list(enc["input_ids"]), list(enc["offset_mapping"])
    has_bos = (
      bool(cids) and tokenizer.bos_token_id is not None and cids[0] == tokenizer.bos_token_id
    )
    if has_bos:
      if c == 0:
        ids.append(cids[0])
        offsets.append((-1, -1))
      cids, coffs = cids[1:], coffs[1:]
    ids += cids
    offsets += [(pos + a, pos + b) for a, b in coffs]
    pos += len(chunk)
  return ids, offsets


def tokenize_conversation(
  conversation: Sequence[dict],
  tokenizer,
  template: str = "vicuna_v1",
  image_token_id: Optional[int] = None,
  num_image_tokens: int = 576,
  max_length: Optional[int] = None,
) -> Dict[str, np.ndarray]:
  """LLaVA-format conversation -> {"input_ids", "labels"} (int32), non-target tokens = -100.
  max_length truncates both as LLaVA's collator does (tokenizer.model_max_length there)."""
  text, spans = render(conversation, template)
  ids, offsets = tokenize_with_image(text, tokenizer, image_token_id, num_image_tokens)
  labels = []
  for tok, (a, b) in zip(ids, offsets):
    hit = a >= 0 and any(a < e and b > s for s, e in spans)
    labels.append(tok if hit else IGNORE_INDEX)
  ids_arr, labels_arr = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
  if max_length is not None:
    ids_arr, labels_arr = ids_arr[:max_length], labels_arr[:max_length]
  return {"input_ids": ids_arr, "labels": labels_arr}


def pad_batch(
  examples: Sequence[Dict[str, np.ndarray]],
  pad_token_id: int,
  side: str = "right",
  length: Optional[int] = None,
) -> Dict[str, np.ndarray]:
  """Stack tokenised examples: input_ids padded with pad_token_id, labels with -100, attention_mask.
  side='right' for training (as LLaVA), 'left' for generation."""
  n = length or max(len(e["input_ids"]) for e in examples)
  out = {
    "input_ids": np.full((len(examples), n), pad_token_id, np.int32),
    "labels": np.full((len(examples), n), IGNORE_INDEX, np.int32),
    "attention_mask": np.zeros((len(examples), n), np.int32),
  }
  for i, e in enumerate(examples):
    k = min(len(e["input_ids"]), n)
    sl = slice(0, k) if side == "right" else slice(n - k, n)
    out["input_ids"][i, sl] = e["input_ids"][:k]
    out["attention_mask"][i, sl] = 1
    if "labels" in e:
      out["labels"][i, sl] = e["labels"][:k]
  return out
