"""LLaVA model sizes by name: the unit tests' model, a tiny benchmark model and LLaVA-1.5-7B.

Each table maps a config field to its value per size; a size missing from a field's entry keeps the
transformers default (CLIP's ``hidden_act`` is ``quick_gelu``, LLaMA's ``rms_norm_eps`` 1e-6).
"7b" is llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 and Vicuna-7B (vocabulary padded to 32064,
``<image>`` = 32000) (Liu et al., 2023, "Improved Baselines with Visual Instruction Tuning").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import transformers

_VISION = {  # transformers.CLIPVisionConfig
  "hidden_size": {"test": 16, "tiny": 32, "7b": 1024},
  "intermediate_size": {"test": 32, "tiny": 64, "7b": 4096},
  "num_hidden_layers": {"test": 3, "tiny": 3, "7b": 24},
  "num_attention_heads": {"test": 2, "tiny": 2, "7b": 16},
  "image_size": {"test": 28, "tiny": 56, "7b": 336},
  "patch_size": {"test": 14, "tiny": 14, "7b": 14},
  "projection_dim": {"test": 8, "tiny": 16, "7b": 768},
  "hidden_act": {"7b": "quick_gelu"},
}
_TEXT = {  # transformers.LlamaConfig
  "vocab_size": {"test": 64, "tiny": 128, "7b": 32064},
  "hidden_size": {"test": 32, "tiny": 64, "7b": 4096},
  "intermediate_size": {"test": 48, "tiny": 128, "7b": 11008},
  "num_hidden_layers": {"test": 2, "tiny": 2, "7b": 32},
  "num_attention_heads": {"test": 4, "tiny": 4, "7b": 32},
  "num_key_value_heads": {"test": 2, "tiny": 2, "7b": 32},
  "max_position_embeddings": {"test": 128, "tiny": 256, "7b": 4096},
  "rms_norm_eps": {"7b": 1e-5},
  "rope_theta": {"test": 10000.0},
  "pad_token_id": {"test": 0},
  "bos_token_id": {"test": 1},
  "eos_token_id": {"test": 2},
}
_IMAGE_TOKEN_INDEX = {"test": 60, "tiny": 120, "7b": 32000}
SIZES = tuple(_IMAGE_TOKEN_INDEX)


def llava_config(size: str, **text_overrides) -> transformers.LlavaConfig:
  """The LLaVA configuration of a named size.

  Args:
    size: "test" (unit tests: vocabulary 64, 28 px images of 2x2 patches, <image> = 60), "tiny"
      (CPU benchmark: 56 px images of 4x4 patches) or "7b" (LLaVA-1.5-7B).
    **text_overrides: LlamaConfig fields to change, e.g. ``num_key_value_heads=4``.

  Returns:
    a ``transformers.LlavaConfig`` (vision features from layer -2, CLS dropped).
  """
  if size not in SIZES:
    raise ValueError(f"LLaVA size must be one of {SIZES}, got {size!r}")
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

  vision = {k: v[size] for k, v in _VISION.items() if size in v}
  text = {k: v[size] for k, v in _TEXT.items() if size in v} | text_overrides
  return LlavaConfig(
    vision_config=CLIPVisionConfig(**vision),
    text_config=LlamaConfig(**text),
    image_token_index=_IMAGE_TOKEN_INDEX[size],
  )
