"""Conversation templates and label masks, as haotian-liu/LLaVA builds them."""

import numpy as np
import pytest

from fedllava.data.conversation import (
  IGNORE_INDEX,
  generation_prompt,
  move_image_to_front,
  pad_batch,
  render,
  tokenize_conversation,
)
from fedllava.models.convert import load_tokenizer
from fedllava.pretrain import demo

SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. "
  "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TWO_TURNS = [
  {"from": "human", "value": "What is this?\n<image>"},
  {"from": "gpt", "value": "A cat."},
  {"from": "human", "value": "What color?"},
  {"from": "gpt", "value": "Black."},
]
# Strings checked against LLaVA's own Conversation.get_prompt (llava/conversation.py, conv_vicuna_v1).
VICUNA = (
  SYSTEM
  + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: What color? ASSISTANT: Black.</s>"
)
CAPTION = [
  {"from": "human", "value": "Describe.\n<image>"},
  {"from": "gpt", "value": "A black cat."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from tokenizers import Regex, pre_tokenizers

  pre = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(" ", "removed"),
      pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), "isolated"),
    ]
  )
  fast = demo.word_level_tokenizer(demo.vocabulary((VICUNA, "<image>A black cat.\n"), pre), pre)
  path = tmp_path_factory.mktemp("tok")
  fast.save_pretrained(path)
  return load_tokenizer(path)  # the converter's AutoTokenizer path


def test_vicuna_v1_string_and_spans():
  text, spans = render(TWO_TURNS, "vicuna_v1")
  assert text == VICUNA
  assert [text[a:b] for a, b in spans] == ["A cat.</s>", "Black.</s>"]


def test_plain_string_and_spans():
  text, spans = render(CAPTION, "plain")
  assert text == "<image>A black cat.\n"
  assert [text[a:b] for a, b in spans] == ["A black cat.\n"]


def test_image_moved_to_front_and_generation_prompt():
  moved = move_image_to_front([{"from": "human", "value": "  Hi <image> there "}])
  assert moved[0]["value"] == "<image>\nHi  there"
  assert generation_prompt("What is it?") == SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:"
  assert generation_prompt("Q", with_image=False) == SYSTEM + " USER: Q ASSISTANT:"


def _tokens(tok, ids):
  return [tok.convert_ids_to_tokens(int(i)) for i in ids]


def test_vicuna_v1_ids_and_labels(tokenizer):
  img = tokenizer.convert_tokens_to_ids("<image>")
  out = tokenize_conversation(TWO_TURNS, tokenizer, "vicuna_v1", num_image_tokens=3)
  ids, labels = out["input_ids"], out["labels"]
  toks = _tokens(tokenizer, ids)
  assert toks[0] == "<s>" and toks.count("<s>") == 1
  k = toks.index("<image>")
  assert toks[k - 2 : k] == ["USER", ":"] and toks[k : k + 4] == ["<image>"] * 3 + ["\n"]
  assert (ids == img).sum() == 3
  # ids = tokenizer_image_token: BOS + tokens of text before/after <image>, image ids in between
  before, after = VICUNA.split("<image>")
  want = tokenizer(before).input_ids + [img] * 3 + tokenizer(after).input_ids[1:]
  assert ids.tolist() == want
  # the loss sees exactly the assistant replies and their </s>
  kept = _tokens(tokenizer, ids[labels != IGNORE_INDEX])
  assert kept == ["A", "cat", ".", "</s>", "Black", ".", "</s>"]
  assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
  first = toks.index("ASSISTANT")
  assert (labels[: first + 2] == IGNORE_INDEX).all() and labels[first + 2] == ids[first + 2]
  assert tokenize_conversation(TWO_TURNS, tokenizer, num_image_tokens=3, max_length=10)[
    "labels"
  ].shape == (10,)


def test_plain_ids_and_labels(tokenizer):
  img = tokenizer.convert_tokens_to_ids("<image>")
  out = tokenize_conversation(CAPTION, tokenizer, "plain", image_token_id=img, num_image_tokens=4)
  toks = _tokens(tokenizer, out["input_ids"])
  assert toks == ["<s>"] + ["<image>"] * 4 + ["A", "black", "cat", ".", "\n"]
  # LLaVA's preprocess_plain: mask len(tokenizer_image_token("<image>")) = BOS + image tokens
  assert out["labels"].tolist() == [IGNORE_INDEX] * 5 + out["input_ids"][5:].tolist()


def test_first_gpt_turn_skipped_and_errors(tokenizer):
  text, _ = render([{"from": "gpt", "value": "hello"}] + TWO_TURNS, "vicuna_v1")
  assert text == VICUNA
  with pytest.raises(ValueError, match="alternate"):
    render([TWO_TURNS[0], TWO_TURNS[2]], "vicuna_v1")
  with pytest.raises(ValueError, match="unknown conversation template 'llama_3'"):
    render(TWO_TURNS, "llama_3")
  with pytest.raises(ValueError, match="2 turns"):
    render(TWO_TURNS, "plain")
  tokenizer_no_image = type(
    "T", (), {"convert_tokens_to_ids": lambda self, t: 0, "unk_token_id": 0}
  )()
  with pytest.raises(ValueError, match="no <image> token"):
    tokenize_conversation(CAPTION, tokenizer_no_image, "plain")


def test_pad_batch():
  a = {"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 6, 7])}
  b = {"input_ids": np.array([8]), "labels": np.array([8])}
  right = pad_batch([a, b], pad_token_id=0)
  assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
  assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
  assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
  left = pad_batch([a, b], pad_token_id=0, side="left")
  assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"][
    1
  ].tolist() == [0, 0, 1]
