"""LLaVA-format data: validation, LLaVA's label masks, fixed-shape grain batches."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from fedllava.data import llava, llava_loader
from fedllava.data.sources import resize_center_crop
from fedllava.pretrain import demo

IMG, IGNORE, N_IMG = "<image>", -100, 3
SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. "
  "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CAPTIONS = {  # pretraining records (plain): id -> caption
  "c0": "A black cat.",
  "c1": "Two dogs run on the beach at sunset near the old pier.",
  "c2": "A red car.",
  "c3": "An old man reads a newspaper on a green bench in the park.",
  "c4": "Snow.",
}
CHATS = {  # instruction records (vicuna_v1): id -> turns
  "v0": ["What is this?\n<image>", "A cat.", "What color?", "Black."],
  "v1": ["<image>\nDescribe the image.", "Two dogs run on the beach at sunset near the old pier."],
  "v2": [
    "Where is it? <image>",
    "In the park.",
    "Is it sunny?",
    "Yes, it is.",
    "Why?",
    "No clouds.",
  ],
  "v3": ["<image> Count the cars.", "One red car."],
}


def _conv(turns):
  return [{"from": ("human", "gpt")[j % 2], "value": v} for j, v in enumerate(turns)]


def _save_image(path, size=(40, 30), seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def tokenizer():
  """A word-level tokenizer that splits like LLaMA's SentencePiece where LLaVA's counting relies
  on it: a space joins the following word ("ASSISTANT: A" -> ":", " A") and a trailing space is a
  token of its own ("ASSISTANT: " -> ":", " "), which LLaVA's "- 2" assumes (BOS + that space)."""
  from tokenizers import Regex, pre_tokenizers

  pre = pre_tokenizers.Split(Regex(r" ?\w+| ?[^\w\s]|\n| "), "isolated")
  texts = [SYSTEM, "USER: ASSISTANT: ", " ", "\n"] + list(CAPTIONS.values())
  texts += [v for turns in CHATS.values() for v in turns]
  return demo.word_level_tokenizer(demo.vocabulary(texts, pre), pre)


def _write_set(tmp_path, entries, images):
  root = tmp_path / "images"
  root.mkdir(parents=True)
  for k, name in enumerate(images):
    _save_image(root / name, size=(40 + 7 * k, 30 + 3 * k), seed=k)
  path = tmp_path / "data.json"
  path.write_text(json.dumps(entries))
  return str(path), str(root)


@pytest.fixture
def plain_set(tmp_path):
  entries = [
    {"id": k, "image": f"{k}.png", "conversations": _conv([f"Describe.\n{IMG}", c])}
    for k, c in CAPTIONS.items()
  ]
  return _write_set(tmp_path / "plain", entries, [f"{k}.png" for k in CAPTIONS])


@pytest.fixture
def chat_set(tmp_path):
  entries = [
    {"id": k, "image": f"{k}.png", "conversations": _conv(turns)} for k, turns in CHATS.items()
  ]
  return _write_set(tmp_path / "chat", entries, [f"{k}.png" for k in CHATS])


# ---- An independent transcription of haotian-liu/LLaVA's masking (llava/train/train.py:
# preprocess_multimodal, preprocess_plain, preprocess_v1; llava/mm_utils.py tokenizer_image_token;
# llava/conversation.py conv_vicuna_v1.get_prompt), one image placeholder as LLaVA has it.
PLACEHOLDER = -200


def _llava_tokenizer_image_token(prompt, tok):
  chunks = [tok(c).input_ids for c in prompt.split(IMG)]
  skip = 1 if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id else 0
  ids = [chunks[0][0]] if skip else []
  pieces = []
  for k, c in enumerate(chunks):
    if k:
      pieces.append([PLACEHOLDER] * (skip + 1))
    pieces.append(c)
  for p in pieces:
    ids += p[skip:]
  return ids


def _llava_multimodal(turns):
  out = []
  for v in turns:
    if IMG in v:
      v = (IMG + "\n" + v.replace(IMG, "").strip()).strip()
    out.append(v)
  return out


def _llava_plain(turns, tok):
  text = IMG + turns[1] + "\n"  # source[0] becomes the bare image token; sep = "\n"
  ids = _llava_tokenizer_image_token(text, tok)
  labels = list(ids)
  n = len(_llava_tokenizer_image_token(IMG, tok))
  labels[:n] = [IGNORE] * n
  return ids, labels


def _llava_v1(turns, tok):
  turns = _llava_multimodal(turns)
  roles, seps = ("USER", "ASSISTANT"), (" ", "</s>")
  text = SYSTEM + seps[0]
  for j, v in enumerate(turns):
    text += roles[j % 2] + ": " + v + seps[j % 2]
  ids = _llava_tokenizer_image_token(text, tok)
  labels = list(ids)
  sep = seps[0] + roles[1] + ": "
  cur = 1
  labels[:cur] = [IGNORE] * cur
  for rou in text.split(seps[1]):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = len(_llava_tokenizer_image_token(rou, tok))
    instruction_len = len(_llava_tokenizer_image_token(parts[0], tok)) - 2
    labels[cur : cur + instruction_len] = [IGNORE] * instruction_len
    cur += round_len
  labels[cur:] = [IGNORE] * (len(labels) - cur)
  assert cur == len(ids), "LLaVA would report a tokenization mismatch (and mask everything)"
  return ids, labels


def _expand_and_truncate(ids, labels, image_id, max_length):
  """llava-hf's N image positions (labels -100, as LLaVA's model sets them), then the collator's
  truncation and padding (input_ids with pad, labels with -100)."""
  out_ids, out_labels = [], []
  for i, lab in zip(ids, labels):
    if i == PLACEHOLDER:
      out_ids += [image_id] * N_IMG
      out_labels += [IGNORE] * N_IMG
    else:
      out_ids.append(i)
      out_labels.append(lab)
  return out_ids[:max_length], out_labels[:max_length]


def _loader(records, root, tok, **kw):
  args = dict(
    template="plain", max_length=16, batch_size=2, image_size=12, num_image_tokens=N_IMG, seed=3
  )
  args.update(kw)
  return llava_loader.make_loader(records, root, tok, **args)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_labels_match_llava_masking(template, tokenizer, plain_set, chat_set):
  json_path, root = plain_set if template == "plain" else chat_set
  records, report = llava.read_conversations(json_path, root)
  assert not any(report.values())
  max_length = 16 if template == "plain" else 70  # cuts c1 / c3 and v2's last reply
  loader = _loader(records, root, tokenizer, template=template, max_length=max_length, batch_size=3)
  img, pad = tokenizer.convert_tokens_to_ids(IMG), tokenizer.pad_token_id
  oracle = _llava_plain if template == "plain" else _llava_v1
  source = CAPTIONS if template == "plain" else CHATS
  seen, truncated = set(), 0
  for batch in loader:
    for row, rid in enumerate(batch["ids"]):
      if not batch["valid"][row]:
        continue
      turns = ["", source[rid]] if template == "plain" else source[rid]
      ids, labels = _expand_and_truncate(*oracle(turns, tokenizer), img, max_length)
      assert any(lab != IGNORE for lab in labels)
      k = len(ids)
      truncated += k == max_length
      assert batch["input_ids"][row].tolist() == ids + [pad] * (max_length - k), rid
      assert batch["labels"][row].tolist() == labels + [IGNORE] * (max_length - k), rid
      assert batch["attention_mask"][row].tolist() == [1] * k + [0] * (max_length - k)
      seen.add(rid)
  assert seen == set(source) and truncated >= 1


def _bad_set(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  for name in ("good.png", "good2.png", "sub/ok.png"):
    (root / name).parent.mkdir(exist_ok=True)
    _save_image(root / name)
  _save_image(tmp_path / "outside.png")
  (root / "garbage.png").write_bytes(b"not an image at all")
  _save_image(tmp_path / "full.jpg")  # a cut JPEG passes Pillow's verify(), fails to decode
  full = (tmp_path / "full.jpg").read_bytes()
  (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
  os.symlink(tmp_path / "outside.png", root / "link.png")
  os.symlink(root / "good.png", root / "inner_link.png")  # inside the root: fine
  os.symlink(tmp_path, root / "up")  # a folder link leaving the root

  def entry(rid, image, turns=(f"{IMG}\nDescribe.", "A cat.")):
    return {"id": rid, "image": image, "conversations": _conv(list(turns))}

  entries = [
    entry("ok1", "good.png"),
    entry("ok2", "sub/../good2.png"),
    entry("ok3", "sub/ok.png"),
    entry("ok4", "inner_link.png"),
    entry("missing", "nope.png"),
    entry("garbage", "garbage.png"),
    entry("truncated", "truncated.jpg"),
    entry("noimg", "good.png", ("Describe.", "A cat.")),
    entry("imgelsewhere", "good.png", ("Describe.", f"A cat {IMG}.")),
    entry("empty", "good.png", (f"{IMG} Describe.", "  ")),
    entry("dotdot", "../outside.png"),
    entry("absolute", str(tmp_path / "outside.png")),
    entry("symlink", "link.png"),
    entry("dirlink", "up/outside.png"),
    {"image": "good.png", "conversations": _conv([IMG, "x"])},  # no id: "#14"
    {
      "id": "gptfirst",
      "image": "good.png",
      "conversations": [{"from": "gpt", "value": f"{IMG} Hi."}, {"from": "human", "value": "x"}],
    },
    entry("odd", "good.png", (f"{IMG} Describe.", "A cat.", "More?")),
    entry("twoimages", "good.png", (f"{IMG} Describe.", "A cat.", f"And {IMG}?", "Same.")),
    {"id": "noconv", "image": "good.png"},
    {"id": "noimagefield", "conversations": _conv([IMG, "x"])},
    "just a string",  # "#20"
  ]
  path = tmp_path / "data.json"
  path.write_text(json.dumps(entries))
  expected = {
    "malformed": ["#14", "gptfirst", "odd", "twoimages", "noconv", "noimagefield", "#20"],
    "path_escapes_root": ["dotdot", "absolute", "symlink", "dirlink"],
    "missing_image": ["missing"],
    "unreadable_image": ["garbage", "truncated"],
    "no_image_token": ["noimg", "imgelsewhere"],
    "empty_answer": ["empty"],
  }
  return str(path), str(root), expected


def test_bad_entries_skip_and_fail(tmp_path):
  json_path, root, expected = _bad_set(tmp_path)
  records, report = llava.read_conversations(json_path, root, "skip")
  assert [r["id"] for r in records] == ["ok1", "ok2", "ok3", "ok4"]
  assert report == expected
  with pytest.raises(ValueError) as err:
    llava.read_conversations(json_path, root, "fail")
  msg = str(err.value)
  assert "17 of 21 entries are bad" in msg
  for kind, ids in expected.items():
    assert f"{kind}: {len(ids)} (" in msg and ids[0] in msg
  with pytest.raises(ValueError, match="bad_examples must be"):
    llava.read_conversations(json_path, root, "ignore")


def test_escaping_paths_refused(tmp_path):
  root = tmp_path / "r"
  (root / "a").mkdir(parents=True)
  os.symlink(tmp_path, root / "out")
  inside = os.path.realpath(root / "a" / "x.png")
  assert llava.resolve_image(str(root), "a/../a/x.png") == inside
  for bad in ("../x.png", "a/../../x.png", "/etc/passwd", str(root / "a/x.png"), "out/x.png"):
    assert llava.resolve_image(str(root), bad) is None, bad


@pytest.mark.parametrize("max_length", [9, 40])  # 9 cuts most captions, 40 none
def test_fixed_shapes_padding_and_truncation(tokenizer, plain_set, max_length):
  records, _ = llava.read_conversations(*plain_set)
  loader = _loader(
    records, plain_set[1], tokenizer, batch_size=3, max_length=max_length, fl_image_size=4
  )
  batches = list(loader)
  assert len(batches) == len(loader) == 2  # 5 records, batches of 3
  img, bos = tokenizer.convert_tokens_to_ids(IMG), tokenizer.bos_token_id
  shapes = {
    "images": ((3, 12, 12, 3), np.uint8),
    "fl_images": ((3, 4, 4, 3), np.uint8),
    "input_ids": ((3, max_length), np.int32),
    "labels": ((3, max_length), np.int32),
    "attention_mask": ((3, max_length), np.int32),
    "valid": ((3,), np.bool_),
  }
  for b in batches:
    assert set(b) == set(shapes) | {"ids"}
    for key, (shape, dtype) in shapes.items():
      assert b[key].shape == shape and b[key].dtype == dtype, key
    assert ((b["input_ids"] == img).sum(1) == N_IMG).all()  # every row, placeholders too
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
  assert batches[1]["valid"].tolist() == [True, True, False] and batches[1]["ids"][2] == ""
  filler = batches[1]
  assert filler["input_ids"][2].tolist()[: N_IMG + 1] == [bos] + [img] * N_IMG
  assert (filler["labels"][2] == IGNORE).all() and (filler["images"][2] == 0).all()
  assert filler["attention_mask"][2].tolist() == [1] * (N_IMG + 1) + [0] * (max_length - N_IMG - 1)
  ids = [i for b in batches for i, v in zip(b["ids"], b["valid"]) if v]
  assert sorted(ids) == sorted(CAPTIONS)
  lengths = {i: m.sum() for b in batches for i, m in zip(b["ids"], b["attention_mask"])}
  for k, c in CAPTIONS.items():  # BOS + image tokens + caption + "\n", cut at max_length
    n_caption = len(tokenizer(c).input_ids) - 1  # without BOS
    assert lengths[k] == min(max_length, 1 + N_IMG + n_caption + 1), k
  assert (max(lengths.values()) == max_length) == (max_length == 9)
  with pytest.raises(ValueError, match="cuts the image tokens"):
    _loader(records, plain_set[1], tokenizer, max_length=N_IMG + 1)


def test_images_match_clip_processor_and_fl_resize(tmp_path):
  from transformers import CLIPImageProcessor

  path = tmp_path / "x.png"
  _save_image(path, size=(53, 37), seed=5)
  out = llava_loader.load_image(str(path), image_size=20, fl_image_size=8)
  proc = CLIPImageProcessor(
    size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20}, do_rescale=False
  )
  proc.do_normalize = False
  want = proc(Image.open(path), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_array_equal(out["images"], want.astype(np.uint8))
  np.testing.assert_array_equal(
    out["fl_images"], resize_center_crop(np.asarray(Image.open(path)), 8)
  )
  square = llava_loader.load_image(str(path), image_size=53, pad_to_square=True)["images"]
  assert (square[:8] == [int(255 * m) for m in llava_loader._CLIP_MEAN]).all()


def test_deterministic_epochs_and_resume(tokenizer, chat_set):
  records, _ = llava.read_conversations(*chat_set)
  kw = dict(template="vicuna_v1", max_length=70, batch_size=3)

  def order(**more):
    return [b["ids"] for b in _loader(records, chat_set[1], tokenizer, **{**kw, **more})]

  two = order(num_epochs=2)
  assert len(two) == 3 and two[-1][-1] == "" and two == order(num_epochs=2)
  flat = [i for b in two for i in b if i]
  assert sorted(flat[:4]) == sorted(flat[4:]) == sorted(CHATS) and flat[:4] != flat[4:]
  assert order(num_epochs=2, seed=4) != two
  assert [i for b in order(shuffle=False) for i in b][:4] == list(CHATS)
  loader = _loader(records, chat_set[1], tokenizer, num_epochs=2, **kw)
  assert [b["ids"] for b in loader.iterate(1)] == two[1:]
  forever = iter(_loader(records, chat_set[1], tokenizer, num_epochs=None, **kw))
  endless = [next(forever)["ids"] for _ in range(3)]
  assert endless[:2] == two[:2] and endless[2][:2] == two[2][:2] and endless[2][2] != ""


def test_unreadable_image_midway_is_masked_or_raises(tokenizer, plain_set):
  json_path, root = plain_set
  records, _ = llava.read_conversations(json_path, root)
  with open(os.path.join(root, "c2.png"), "wb") as f:
    f.write(b"corrupted after validation")
  loader = _loader(records, root, tokenizer, batch_size=5, shuffle=False)
  (batch,) = list(loader)
  assert batch["valid"].tolist() == [True, True, False, True, True]
  assert batch["ids"][2] == "c2" and (batch["labels"][2] == IGNORE).all()
  assert loader.report == {"unreadable_image": ["c2"]}
  with pytest.raises(ValueError, match="failed to decode.*c2"):
    list(_loader(records, root, tokenizer, batch_size=5, bad_examples="fail"))


def test_decompression_bomb_is_skipped_and_reported(tokenizer, plain_set, monkeypatch):
  """Pillow's DecompressionBombError is not an OSError: it is still an unreadable image, skipped
  at validation and masked while loading, reported by id."""
  from PIL import Image

  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # a bomb above 2 x 5000 pixels
  json_path, root = plain_set
  records, _ = llava.read_conversations(json_path, root)
  Image.new("L", (120, 120)).save(os.path.join(root, "c2.png"))  # 14400 pixels
  with pytest.raises(Image.DecompressionBombError):
    llava_loader.load_image(os.path.join(root, "c2.png"), 12)
  loader = _loader(records, root, tokenizer, batch_size=5, shuffle=False)
  (batch,) = list(loader)
  assert batch["valid"].tolist() == [True, True, False, True, True]
  assert loader.report == {"unreadable_image": ["c2"]}
  kept, report = llava.read_conversations(json_path, root)
  assert report["unreadable_image"] == ["c2"] and "c2" not in [r["id"] for r in kept]


def test_plain_refuses_multi_turn(tokenizer, chat_set):
  records, _ = llava.read_conversations(*chat_set)
  with pytest.raises(ValueError, match="'plain' template takes 2 turns"):
    _loader(records, chat_set[1], tokenizer)


def test_workers_match_in_process(tokenizer, chat_set):
  records, _ = llava.read_conversations(*chat_set)
  kw = dict(template="vicuna_v1", max_length=70, batch_size=3, num_epochs=2, fl_image_size=4)
  local = list(_loader(records, chat_set[1], tokenizer, worker_count=0, **kw))
  pooled = list(_loader(records, chat_set[1], tokenizer, worker_count=2, **kw))
  assert len(local) == len(pooled) == 3
  for a, b in zip(local, pooled):
    assert a.keys() == b.keys() and a["ids"] == b["ids"]
    for key in a:
      if key != "ids":
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
