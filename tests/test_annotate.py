"""Stage 1 annotation: LLaVA-format JSON the loader reads, resume, fixed shapes, and parity with
calling LlavaModel.generate directly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fedllava.data.conversation import generation_prompt, tokenize_with_image
from fedllava.data.llava import read_conversations
from fedllava.models.clip import CLIP_MEAN, CLIP_STD
from fedllava.models.llava import LlavaModel
from fedllava.models.llava_configs import llava_config
from fedllava.pretrain import demo, prompts
from fedllava.pretrain.annotator import annotate_folder, decode_answer, list_images

jax.config.update("jax_default_matmul_precision", "highest")
CFG = llava_config("test")  # vocabulary 64, <image> = 60, 28 px images -> 4 image tokens
KW = dict(batch_size=2, max_new_tokens=6, prompt_len=72, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """Word-level tokenizer over the model's 64 ids: <image> at 60, words of the prompts elsewhere."""
  from tokenizers import Regex, pre_tokenizers

  pre = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(" ", "removed"),
      pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), "isolated"),
    ]
  )
  text = generation_prompt("", with_image=False) + " " + " ".join(prompts.QUESTIONS["conversation"])
  words = []
  for w, _ in pre.pre_tokenize_str(text):
    if w not in words:
      words.append(w)
  specials = ["<unk>", "<s>", "</s>", "<pad>"]
  words = (words + [f"w{i}" for i in range(64)])[: 64 - len(specials) - 1]
  tokens = specials + words[:56] + ["<image>"] + words[56:]
  assert len(tokens) == 64 and tokens[CFG.image_token_index] == "<image>"
  fast = demo.word_level_tokenizer(tokens, pre)
  path = tmp_path_factory.mktemp("tok")
  fast.save_pretrained(path)
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="module")
def llava():
  model = LlavaModel(CFG, dtype=jnp.float32)
  return model, model.init_params(jax.random.PRNGKey(0))


def make_images(folder, n, start=0):
  """n random RGB images; every third is a 40x30 JPEG (resized and cropped), the rest 28x28 PNGs."""
  os.makedirs(folder, exist_ok=True)
  rs = np.random.RandomState(start)
  names = []
  for i in range(start, start + n):
    if i % 3 == 2:
      name = f"img{i}.jpg"
      Image.fromarray(rs.randint(0, 256, (30, 40, 3), np.uint8)).save(os.path.join(folder, name))
    else:
      name = f"img{i}.png"
      Image.fromarray(rs.randint(0, 256, (28, 28, 3), np.uint8)).save(os.path.join(folder, name))
    names.append(name)
  return names


class CountingGenerate:
  """Wraps model.generate: counts calls and, if `crash_on` is set, raises on that call."""

  def __init__(self, model, crash_on=None):
    self.real, self.crash_on, self.calls = model.generate, crash_on, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    if self.calls == self.crash_on:
      raise KeyboardInterrupt("simulated kill")
    return self.real(*args, **kwargs)


def test_annotates_folder_into_loader_format(llava, tokenizer, tmp_path):
  model, params = llava
  image_dir = tmp_path / "images"
  names = make_images(image_dir / "sub", 3) + make_images(image_dir, 1, start=3)
  (image_dir / "notes.txt").write_text("not an image")
  out = tmp_path / "ann.json"
  report = annotate_folder(model, params, tokenizer, str(image_dir), str(out), **KW)
  ids = sorted(["sub/" + os.path.splitext(n)[0] for n in names[:3]] + ["img3"])
  want = {(i, k) for i in ids for k in prompts.KINDS}
  entries = json.loads(out.read_text())
  assert {(e["id"], e["kind"]) for e in entries} == want and len(entries) == 12
  for e in entries:
    assert e["image"] == e["id"] + (".jpg" if e["id"].endswith("2") else ".png")
    question = prompts.choose_question(e["kind"], e["id"], 0)
    assert question in prompts.QUESTIONS[e["kind"]]
    assert e["conversations"][0] == {"from": "human", "value": "<image>\n" + question}
    assert e["conversations"][1]["from"] == "gpt"
  records, bad = read_conversations(str(out), str(image_dir), bad_examples="skip")
  empty = {(e["id"], e["kind"]) for e in entries if not e["conversations"][1]["value"]}
  assert {(r["id"], r["kind"]) for r in records} == want - empty
  assert sorted(bad["empty_answer"]) == sorted(i for i, _ in empty)
  assert sum(len(v) for k, v in bad.items() if k != "empty_answer") == 0
  assert report["records"] == 12 and report["kinds"] == {k: 4 for k in prompts.KINDS}
  assert report["generated"] == {k: 4 for k in prompts.KINDS} and report["skipped_done"] == 0
  assert {(e["id"], e["kind"]) for e in report["empty"]} == empty
  assert report["loaded"] == len(records) and report["images_per_s"] > 0
  assert not os.path.exists(str(out) + ".partial.jsonl")


def test_empty_answers_are_written_and_flagged(llava, tokenizer, tmp_path):
  model, params = llava
  # a zero lm_head gives all-equal logits, so greedy picks id 0 = <unk>: decoded without special
  # tokens, every answer is the empty string
  lm = dict(
    params["language_model"],
    lm_head={"kernel": jnp.zeros_like(params["language_model"]["lm_head"]["kernel"])},
  )
  zero = dict(params, language_model=lm)
  make_images(tmp_path / "im", 2)
  out = tmp_path / "ann.json"
  report = annotate_folder(
    model, zero, tokenizer, str(tmp_path / "im"), str(out), kinds=("conversation",), **KW
  )
  entries = json.loads(out.read_text())
  assert [e["conversations"][1]["value"] for e in entries] == ["", ""]
  assert report["empty"] == [
    {"id": "img0", "kind": "conversation"},
    {"id": "img1", "kind": "conversation"},
  ]
  assert report["truncated"] == 2 and report["loaded"] == 0
  assert sorted(report["bad"]["empty_answer"]) == ["img0", "img1"]


def test_resume_after_kill_skips_written_images(llava, tokenizer, tmp_path, monkeypatch):
  model, params = llava
  make_images(tmp_path / "im", 4)
  kw = dict(kinds=("conversation",), **KW)
  full = tmp_path / "full.json"
  annotate_folder(model, params, tokenizer, str(tmp_path / "im"), str(full), **kw)

  out = tmp_path / "ann.json"
  crash = CountingGenerate(model, crash_on=2)  # the 2nd batch (images 2 and 3) dies
  monkeypatch.setattr(model, "generate", crash)
  with pytest.raises(KeyboardInterrupt):
    annotate_folder(model, params, tokenizer, str(tmp_path / "im"), str(out), **kw)
  partial = str(out) + ".partial.jsonl"
  assert not out.exists()
  with open(partial) as f:
    assert [json.loads(line)["id"] for line in f] == ["img0", "img1"]
  with open(partial, "a") as f:
    f.write('{"id": "img2", "ki')  # a line torn by the kill

  again = CountingGenerate(model)
  monkeypatch.setattr(model, "generate", again)
  report = annotate_folder(model, params, tokenizer, str(tmp_path / "im"), str(out), **kw)
  assert again.calls == 1  # images 2 and 3 only: one batch of 2
  assert report["skipped_done"] == 2 and report["generated"] == {"conversation": 2}
  assert json.loads(out.read_text()) == json.loads(full.read_text())
  assert not os.path.exists(partial)

  third = CountingGenerate(model)
  monkeypatch.setattr(model, "generate", third)
  report = annotate_folder(model, params, tokenizer, str(tmp_path / "im"), str(out), **kw)
  assert third.calls == 0 and report["skipped_done"] == 4 and report["records"] == 4


def test_fixed_shapes_compile_once_with_partial_last_batch(llava, tokenizer, tmp_path, monkeypatch):
  _, params = llava
  model = LlavaModel(CFG, dtype=jnp.float32)  # a fresh instance: nothing of it is compiled yet
  make_images(tmp_path / "im", 5)
  gen = CountingGenerate(model)
  monkeypatch.setattr(model, "generate", gen)
  marks = []  # for each XLA compilation: how many generate calls had started

  def on_event(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      marks.append(gen.calls)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    annotate_folder(
      model,
      params,
      tokenizer,
      str(tmp_path / "im"),
      str(tmp_path / "ann.json"),
      kinds=("conversation",),
      batch_size=2,  # 5 prompts: batches of 2, 2 and a padded 1
      max_new_tokens=5,
      prompt_len=72,
      seed=1,
    )
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  # the premise: unpadded, the three batches' prompts would have different lengths
  lengths = [
    len(tokenize_with_image(generation_prompt(q), tokenizer, None, 4)[0])
    for q in (prompts.choose_question("conversation", f"img{i}", 1) for i in range(5))
  ]
  assert len({max(lengths[0:2]), max(lengths[2:4]), lengths[4]}) > 1
  assert gen.calls == 3
  assert 1 in marks  # the first batch compiled generation ...
  assert max(marks) == 1  # ... and the second and the partial third compiled nothing


def _direct_answer(model, params, tokenizer, path, question, max_new):
  """Independent path: CLIP normalisation by hand, an unpadded prompt, model.generate on pixels."""
  x = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
  pix = ((x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)[None]
  ids, _ = tokenize_with_image(generation_prompt(question), tokenizer, None, model.num_image_tokens)
  ids = np.asarray([ids], np.int32)
  out = model.generate(
    params, jnp.asarray(pix, jnp.float32), ids, np.ones_like(ids), max_new, stop_token_ids=(2,)
  )
  tokens = list(np.asarray(out)[0])
  tokens = tokens[: tokens.index(2)] if 2 in tokens else tokens
  return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_greedy_answer_equals_direct_generate(llava, tokenizer, tmp_path):
  model, params = llava
  make_images(tmp_path / "im", 2)
  out = tmp_path / "ann.json"
  annotate_folder(
    model, params, tokenizer, str(tmp_path / "im"), str(out), kinds=("detailed_description",), **KW
  )
  entries = {e["id"]: e for e in json.loads(out.read_text())}
  for image_id in ("img0", "img1"):  # row 0 and row 1 of one batch, both left-padded
    question = prompts.choose_question("detailed_description", image_id, KW["seed"])
    want = _direct_answer(
      model, params, tokenizer, tmp_path / "im" / f"{image_id}.png", question, KW["max_new_tokens"]
    )
    assert want  # a non-trivial comparison
    assert entries[image_id]["conversations"][1]["value"] == want


def test_sampling_is_seeded_and_resume_safe(llava, tokenizer, tmp_path, monkeypatch):
  model, params = llava
  make_images(tmp_path / "im", 4)
  kw = dict(temperature=1.5, top_p=0.9, kinds=("conversation",), **KW)
  a, b, c = (tmp_path / f"{n}.json" for n in "abc")
  annotate_folder(model, params, tokenizer, str(tmp_path / "im"), str(a), **kw)
  annotate_folder(model, params, tokenizer, str(tmp_path / "im"), str(b), **{**kw, "seed": 7})
  monkeypatch.setattr(model, "generate", CountingGenerate(model, crash_on=2))
  with pytest.raises(KeyboardInterrupt):
    annotate_folder(model, params, tokenizer, str(tmp_path / "im"), str(c), **kw)
  monkeypatch.undo()
  annotate_folder(model, params, tokenizer, str(tmp_path / "im"), str(c), **kw)
  assert json.loads(c.read_text()) == json.loads(a.read_text())
  assert json.loads(b.read_text()) != json.loads(a.read_text())


def test_question_choice_and_folder_rules(tmp_path, llava, tokenizer):
  ids = [f"x{i}" for i in range(40)]
  picks = [prompts.choose_question("complex_reasoning", i, 3) for i in ids]
  assert picks == [prompts.choose_question("complex_reasoning", i, 3) for i in ids]
  assert picks != [prompts.choose_question("complex_reasoning", i, 4) for i in ids]
  assert len(set(picks)) > 1
  with pytest.raises(ValueError, match="kinds must be"):
    prompts.check_kinds(("conversation", "caption"))
  # a symlink out of the folder is left out; two files with one id are an error
  make_images(tmp_path / "im", 2)
  make_images(tmp_path / "elsewhere", 1, start=5)
  os.symlink(tmp_path / "elsewhere" / "img5.png", tmp_path / "im" / "link.png")
  pairs, outside = list_images(str(tmp_path / "im"))
  assert pairs == [("img0", "img0.png"), ("img1", "img1.png")] and outside == ["link.png"]
  Image.new("RGB", (28, 28)).save(tmp_path / "im" / "img0.jpg")
  with pytest.raises(ValueError, match="share the id 'img0'"):
    list_images(str(tmp_path / "im"))
  # an answer ends at its first stop token (here the word at id 7): nothing after it is kept
  words = [tokenizer.convert_ids_to_tokens(i) for i in (5, 6, 8)]
  assert decode_answer(tokenizer, [5, 6, 7, 8, 3], (7,)) == (" ".join(words[:2]), True)
  assert decode_answer(tokenizer, [5, 6, 8], (7,)) == (" ".join(words), False)
  model, params = llava
  with pytest.raises(ValueError, match="prompt_len=8 is too short"):
    annotate_folder(
      model,
      params,
      tokenizer,
      str(tmp_path / "im"),
      str(tmp_path / "a.json"),
      **{**KW, "prompt_len": 8},
    )


def test_decompression_bomb_is_skipped_and_reported(llava, tokenizer, tmp_path, monkeypatch):
  """Pillow's DecompressionBombError (not an OSError) skips the image like any unreadable one."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # the 28x28 and 40x30 images stay below
  model, params = llava
  image_dir = tmp_path / "images"
  make_images(image_dir, 2)
  Image.new("L", (60, 60)).save(image_dir / "bomb.png")  # 3600 > 2 x 1500 pixels
  out = tmp_path / "ann.json"
  report = annotate_folder(model, params, tokenizer, str(image_dir), str(out), **KW)
  assert report["unreadable"] == ["bomb.png"]
  assert {e["id"] for e in json.loads(out.read_text())} == {"img0", "img1"}
