"""The questions the MLLM answers for each unlabeled image (paper Sec. 3.1), in our own wording.

The paper transforms unlabeled images, as LLaVA does (Liu et al., 2023, "Visual Instruction
Tuning", Sec. 3), into three kinds of text:
  conversation          questions a person asks about the photo: which objects, how many, what they
                        do, where they are, how they are placed relative to each other;
  detailed_description  a request for a thorough description of the whole image;
  complex_reasoning     questions whose answer needs a step-by-step argument from what is visible.

LLaVA asks GPT-4 (text-only, from captions and boxes) to write these; here the MLLM looks at the
image itself and answers one question per (image, kind). A "conversation" is therefore a single
question/answer turn: each question covers one of the aspects above, and across images the seeded
choice spreads them over all aspects (a multi-turn dialogue would chain generations on earlier
answers, which the fixed-shape batched decoder does not do).

The choice of question is a pure function of (seed, kind, image id): it does not depend on the
order in which images are annotated, so a resumed run asks the same questions as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Tuple

KINDS: Tuple[str, ...] = ("conversation", "detailed_description", "complex_reasoning")

QUESTIONS: Dict[str, Tuple[str, ...]] = {
  "conversation": (
    "What is the main object in this image?",
    "How many objects can you count in the picture, and what are they?",
    "What is happening in this image?",
    "Where in the picture is the main subject?",
    "What is next to the main object, and how are the two placed relative to each other?",
    "Which colors stand out in this image, and on which objects?",
    "Which object is closest to the camera?",
    "Is anyone or anything moving in this scene? What are they doing?",
  ),
  "detailed_description": (
    "Describe this image in detail.",
    "Give a thorough description of everything you can see in this picture.",
    "Go through the contents of this image, from the most prominent object to the background.",
    "Write a detailed paragraph about the scene, the objects in it and how they are arranged.",
    "What does this picture show? Describe it as fully as you can.",
    "Explain the visual content of this image in detail, including colors, shapes and textures.",
  ),
  "complex_reasoning": (
    "What can you infer about the setting of this image, and which details support your answer?",
    "Why might the scene in this picture look the way it does? Explain step by step.",
    "What is likely to happen next in this scene? Explain your reasoning.",
    "What purpose might the main object in this image serve, and how can you tell?",
    "Which visual features in this image would tell its main object apart from similar ones? "
    "Explain why each one helps.",
    "What is unusual or noteworthy about this image, and why?",
  ),
}


def check_kinds(kinds) -> Tuple[str, ...]:
  """Returns ``kinds`` as a tuple, raising for an unknown or repeated kind."""
  kinds = tuple(kinds)
  unknown = [k for k in kinds if k not in QUESTIONS]
  if unknown or not kinds or len(set(kinds)) != len(kinds):
    raise ValueError(
      f"kinds must be distinct names from {KINDS} (at least one), got {kinds!r}"
      + (f"; unknown: {unknown}" if unknown else "")
    )
  return kinds


def choose_question(kind: str, image_id: str, seed: int) -> str:
  """The question asked about image ``image_id`` for ``kind``.

  Args:
    kind: one of ``KINDS``.
    image_id: the image's id (its path relative to the image folder, without extension).
    seed: the annotation seed.

  Returns:
    ``QUESTIONS[kind][i]`` with ``i = sha256(f"{seed}/{kind}/{image_id}") mod len(QUESTIONS[kind])``:
    deterministic across processes (unlike Python's salted ``hash``) and independent of image order.
  """
  questions = QUESTIONS[check_kinds((kind,))[0]]
  digest = hashlib.sha256(f"{int(seed)}/{kind}/{image_id}".encode("utf-8")).digest()
  return questions[int.from_bytes(digest[:8], "big") % len(questions)]
