"""llava-hf checkpoint directory -> (LlavaModel, Flax parameter tree), without torch.

Reads `config.json` and `model.safetensors`, or the shards listed in `model.safetensors.index.json`,
one shard file at a time (memory-mapped; each tensor is converted, cast to `dtype` and placed on
device before the next is read). Both key layouts are accepted:
    legacy (what 4.57's save_pretrained writes, and the llava-hf hub repos):
        vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*
    new (4.52+ module names): model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.*
Tensor rules: Linear weight -> kernel (transposed); Conv2d OIHW -> HWIO kernel; LayerNorm weight ->
scale; Embedding weight -> embedding; LLaMA RMSNorm keeps `weight`; biases stay `bias`.
Tensors are read from the files' raw bytes (`safetensors_io`), so bfloat16 needs no torch.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fedllava import errors
from fedllava.models.llava import LlavaModel, memory_estimate
from fedllava.models.safetensors_io import read_header, read_tensor
from fedllava.sharding import fsdp_partition_specs

# Buffers PyTorch may save that have no Flax parameter.
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
_PREFIXES = (  # (checkpoint prefix, our prefix); longest match first
  ("model.vision_tower.", "vision_tower."),
  ("model.multi_modal_projector.", "multi_modal_projector."),
  ("model.language_model.", "language_model.model."),
  ("language_model.model.", "language_model.model."),
  ("language_model.lm_head.", "language_model.lm_head."),
  ("lm_head.", "language_model.lm_head."),
  ("vision_tower.", "vision_tower."),
  ("multi_modal_projector.", "multi_modal_projector."),
)


def load_tokenizer(path):
  """The checkpoint's tokenizer via AutoTokenizer (local files only, no remote code)."""
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)


def read_config(path):
  """transformers LlavaConfig from `path/config.json`, with clear errors."""
  from transformers import LlavaConfig

  cfg_file = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise errors.MissingInputError(f"LLaVA checkpoint directory {path!r} does not exist")
  if not os.path.isfile(cfg_file):
    raise errors.MissingInputError(
      f"{path!r} has no config.json: not a Hugging Face checkpoint directory"
    )
  with open(cfg_file) as f:
    model_type = json.load(f).get("model_type")
  if model_type != "llava":
    raise ValueError(
      f"{cfg_file} has model_type {model_type!r}; expected 'llava' (a llava-hf checkpoint)"
    )
  return LlavaConfig.from_pretrained(path, local_files_only=True)


def checkpoint_files(path) -> list:
  """The safetensors files of a checkpoint, checking that every shard the index names exists."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [s for s in files if not os.path.isfile(os.path.join(path, s))]
    if missing:
      raise errors.MissingInputError(f"{index} names shard(s) missing from {path!r}: {missing}")
    return [os.path.join(path, s) for s in files]
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  raise errors.MissingInputError(
    f"{path!r} has neither model.safetensors nor model.safetensors.index.json "
    "(only safetensors checkpoints are read; no pickled .bin files)"
  )


def map_key(key: str, ndim: int) -> Optional[Tuple[Tuple[str, ...], str]]:
  """Checkpoint key -> (our parameter path, transform) or None if the key is not LLaVA's.
  transform: 'T' (Linear), 'conv' (OIHW -> HWIO), '' (as is)."""
  for src, dst in _PREFIXES:
    if key.startswith(src):
      key = dst + key[len(src) :]
      break
  else:
    return None
  parts = key.split(".")
  leaf, module = parts[-1], parts[-2]
  if leaf == "weight":
    if ndim == 4:
      return tuple(parts[:-1]) + ("kernel",), "conv"
    if module in ("embed_tokens", "position_embedding"):
      return tuple(parts[:-1]) + ("embedding",), ""
    if ndim == 1:
      return tuple(parts[:-1]) + ("scale" if parts[0] == "vision_tower" else "weight",), ""
    if ndim == 2:
      return tuple(parts[:-1]) + ("kernel",), "T"
    return None
  return tuple(parts), ""


def load_llava(
  path,
  dtype=jnp.bfloat16,
  compute_dtype=None,
  mesh=None,
  axis_name: str = "model",
  remat: bool = False,
  verbose: bool = True,
):
  """Load a llava-hf checkpoint directory -> (LlavaModel, params).

  dtype: the stored parameter dtype (bf16 default for the frozen teacher); compute_dtype defaults
  to it. mesh: if given, every parameter is placed FSDP-sharded over `axis_name` as it is read."""
  path = str(path)
  config = read_config(path)
  files = checkpoint_files(path)
  model = LlavaModel(config, dtype=compute_dtype or dtype, remat=remat)
  expected = flatten_dict(model.param_shapes())
  n_dev = mesh.shape[axis_name] if mesh is not None else 1
  if verbose:
    print(
      memory_estimate(list(expected.values()), dtype, n_dev)
      + f"; reading {len(files)} file(s) from {path}"
    )
  specs = (
    flatten_dict(fsdp_partition_specs(unflatten_dict(expected), n_dev, axis_name))
    if mesh is not None
    else None
  )
  vocab = config.text_config.vocab_size
  loaded: Dict[tuple, jax.Array] = {}
  unmapped, wrong_shape = [], []
  for file in files:
    header, data_start = read_header(file)
    mm = np.memmap(file, dtype=np.uint8, mode="r")  # mapped once per file
    for key in sorted(header):
      info = header[key]
      if key.endswith(_IGNORED_SUFFIXES):
        continue
      mapped = map_key(key, len(info["shape"]))
      if (
        mapped is not None
        and mapped[0][:2] == ("language_model", "lm_head")
        and getattr(config.text_config, "tie_word_embeddings", False)
      ):
        continue  # tied to embed_tokens: no separate parameter
      if mapped is None or mapped[0] not in expected:
        unmapped.append(key)
        continue
      fpath, how = mapped
      if fpath[-2] in ("embed_tokens", "lm_head") and info["shape"][0] != vocab:
        raise ValueError(
          f"config.json says text vocab_size={vocab} but {key} has "
          f"{info['shape'][0]} rows: config and weights disagree"
        )
      arr = read_tensor(file, info, data_start, mm)
      arr = arr.T if how == "T" else (arr.transpose(2, 3, 1, 0) if how == "conv" else arr)
      if tuple(arr.shape) != tuple(expected[fpath].shape):
        wrong_shape.append(f"{key}: {tuple(arr.shape)} vs expected {tuple(expected[fpath].shape)}")
        continue
      arr = np.ascontiguousarray(arr.astype(dtype))
      if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, specs[fpath])
        loaded[fpath] = jax.make_array_from_callback(arr.shape, sharding, lambda idx, a=arr: a[idx])
      else:
        loaded[fpath] = jnp.asarray(arr)
      del arr
  missing = sorted(".".join(p) for p in expected if p not in loaded)
  if unmapped or missing or wrong_shape:
    raise ValueError(
      f"checkpoint {path!r} does not fit LLaVA({config.text_config.model_type}): "
      f"unmapped keys {unmapped}; missing parameters {missing}; wrong shapes {wrong_shape}"
    )
  return model, unflatten_dict(loaded)
