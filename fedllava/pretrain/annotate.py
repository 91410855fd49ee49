"""The ``annotate`` stage (Stage 1a, paper Sec. 3.1): loads the LLaVA teacher, runs the annotation
engine (``annotator.annotate_folder``) over ``config.pretrain.unlabeled_dir`` (or the demo's digits)
and writes ``annotations.json`` and ``report.json``; a complete stage is loaded, not rerun.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax

from fedllava import errors
from fedllava.fileio import atomic_write_text
from fedllava.pretrain import prompts
from fedllava.pretrain.annotator import annotate_folder, list_images

OUT_JSON = "annotations.json"
PRETRAIN_JSON = "pretrain_data.json"  # demo only: annotations + templated captions
REPORT = "report.json"


def _covers(out_json: str, image_dir: str, kinds: Sequence[str]) -> bool:
  """Whether ``out_json`` holds a record of every kind for every image of ``image_dir``."""
  if not (os.path.exists(out_json) and os.path.isdir(image_dir)):
    return False
  try:
    with open(out_json, encoding="utf-8") as f:
      have = {(r["id"], r["kind"]) for r in json.load(f)}
  except (OSError, ValueError, KeyError, TypeError):
    return False
  images, _ = list_images(image_dir)
  return bool(images) and all((img, k) in have for img, _ in images for k in kinds)


def run(config, workdir: str, init=None, *, started=None):
  """Stage 1a: the MLLM annotates ``config.pretrain.unlabeled_dir`` (paper Sec. 3.1).

  Loads the llava-hf teacher ``config.pretrain.teacher`` through ``models/convert.py`` (its
  tokenizer with ``AutoTokenizer``, no remote code) and writes ``<workdir>/annotations.json``
  (LLaVA format, one record per image and kind) and ``report.json``. With ``pretrain.demo``
  the teacher is the tiny random one and the images are digits PNGs (``demo.py``), and
  ``pretrain_data.json`` adds templated captions. A stage whose JSON covers every image and whose
  report exists is loaded, not rerun; an interrupted one resumes (``annotate_folder``).

  Returns:
    ``StageResult(None, report, outputs={"annotations": path, "image_dir": folder})`` (demo:
    also ``"pretrain_data"``).
  """
  from fedllava.pretrain import demo, teacher
  from fedllava.stage import StageResult

  p, a = config.pretrain, config.pretrain.annotate
  kinds = prompts.check_kinds([k for k in a.kinds.split(",") if k])
  out_json = os.path.join(workdir, OUT_JSON)
  report_path = os.path.join(workdir, REPORT)
  image_dir = os.path.join(workdir, "unlabeled") if p.demo else p.unlabeled_dir
  outputs = {"annotations": out_json, "image_dir": image_dir}
  if p.demo:
    outputs["pretrain_data"] = os.path.join(workdir, PRETRAIN_JSON)
  done = os.path.exists(report_path) and _covers(out_json, image_dir, kinds)
  if done and (not p.demo or os.path.exists(outputs["pretrain_data"])):
    if started is not None:
      started()
    with open(report_path, encoding="utf-8") as f:
      saved = json.load(f)
    print(f"[annotate] complete in {workdir}; loaded, not rerun")
    return StageResult(None, saved, outputs)

  if p.demo:
    print(demo.LABEL)
    demo_images = demo.digits_images(p.demo_images)  # built in memory before anything is written
    if started is not None:
      started()
    teacher_dir = demo.write_teacher(os.path.join(workdir, "teacher"), config.seed)
    images = demo.write_images(image_dir, len(demo_images[0]))
  else:
    teacher_dir = teacher.resolve_teacher(p.teacher)
    if not os.path.isdir(image_dir):
      raise errors.MissingInputError(
        f"config.pretrain.unlabeled_dir={image_dir!r} is not a folder of images."
      )
  model, params, tokenizer = teacher.load_checkpoint(config, teacher_dir)
  if not p.demo and started is not None:
    started()
  os.makedirs(workdir, exist_ok=True)
  print(f"[annotate] {p.teacher} writes {', '.join(kinds)} for the images of {image_dir}")
  report = annotate_folder(
    model,
    params,
    tokenizer,
    image_dir,
    out_json,
    kinds=kinds,
    batch_size=a.batch_size,
    max_new_tokens=a.max_new_tokens,
    prompt_len=a.prompt_len,
    seed=config.seed,
    temperature=a.temperature,
    template=a.template,
  )
  report["teacher"] = p.teacher
  report["bad"] = {k: len(v) for k, v in report["bad"].items()}
  report["empty"] = len(report["empty"])
  if p.demo:
    n = demo.write_pretrain_data(outputs["pretrain_data"], out_json, images)
    report["demo"] = demo.LABEL
    report["pretrain_data_records"] = n
  print(
    f"[annotate] {report['records']} records for {report['images']} images "
    f"({report['images_per_s']:.2f} images/s; {report['empty']} empty, "
    f"{report['truncated']} truncated answers)"
  )
  if jax.process_index() == 0:
    atomic_write_text(report_path, json.dumps(report, indent=1) + "\n")
  return StageResult(None, report, outputs)
