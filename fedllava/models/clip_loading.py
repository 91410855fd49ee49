"""Loading a CLIP checkpoint (local directory or hub name) as transformers' Flax CLIP and its
parameters, from Flax or PyTorch weights.

Weights are read without unpickling (msgpack or safetensors); a ``pytorch_model.bin`` needs torch and
is read with ``torch.load(weights_only=True)``. ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Optional

import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import FlaxCLIPModel, FlaxCLIPVisionModel
from transformers.models.clip.configuration_clip import CLIPConfig, CLIPVisionConfig

from fedllava.models.safetensors_io import read_file

_MODEL_TYPES = {
  "clip": (CLIPConfig, FlaxCLIPModel),
  "clip_vision_model": (CLIPVisionConfig, FlaxCLIPVisionModel),
}
# Weight files in the order they are preferred; the index files list shards.
_FLAX, _FLAX_INDEX = "flax_model.msgpack", "flax_model.msgpack.index.json"
_SAFE, _SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def _file_getter(path_or_name: str) -> Callable[[str], Optional[str]]:
  """Returns ``get(filename) -> local path or None`` for a local directory or a hub name."""
  if os.path.isdir(path_or_name):
    return lambda f: p if os.path.isfile(p := os.path.join(path_or_name, f)) else None
  if os.path.exists(path_or_name) or path_or_name.startswith(("/", ".", "~")):
    raise ValueError(
      f"CLIP checkpoint {path_or_name!r} is not a directory (expected a checkpoint "
      "directory with config.json and weights, or a Hugging Face hub name)"
    )
  from transformers.utils import cached_file  # hub names only; honours HF_HUB_OFFLINE and the cache

  @functools.lru_cache(maxsize=None)  # one hub lookup per file name
  def get(f):
    return cached_file(
      path_or_name,
      f,
      _raise_exceptions_for_missing_entries=False,
      _raise_exceptions_for_connection_errors=False,
    )

  return get


def _read_state(get: Callable[[str], Optional[str]], where: str) -> dict:
  """Reads a checkpoint's weights, preferring Flax, then safetensors, then ``.bin`` files.

  Returns ``{"format": "flax", "state": {tuple key: array}}`` for Flax weights, or
  ``{"format": "pt", "state": {"dotted.pytorch.name": array}}`` for PyTorch weights (unconverted).
  """

  def shards(index_name):
    with open(get(index_name)) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    paths = [get(s) for s in files]
    if any(p is None for p in paths):
      raise ValueError(f"{where}: {index_name} names shards that are missing: {files}")
    return paths

  if get(_FLAX) or get(_FLAX_INDEX):
    paths = [get(_FLAX)] if get(_FLAX) else shards(_FLAX_INDEX)
    state = {}
    for p in paths:  # msgpack via flax.serialization: no pickle
      state.update(flatten_dict(FlaxCLIPModel.load_flax_weights(p)))
    return {"format": "flax", "state": state}
  if get(_SAFE) or get(_SAFE_INDEX):
    paths = [get(_SAFE)] if get(_SAFE) else shards(_SAFE_INDEX)
    state, fmt = {}, "pt"
    for p in paths:
      tensors, metadata = read_file(p)  # bf16 survives, as ml_dtypes.bfloat16
      fmt = metadata.get("format", "pt")
      state.update(tensors)
    if fmt == "flax":
      return {"format": "flax", "state": {tuple(k.split(".")): v for k, v in state.items()}}
    return {"format": "pt", "state": state}
  if get(_BIN) or get(_BIN_INDEX):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
        f"{where} has only PyTorch .bin weights; converting them needs torch, which is "
        "not installed (install torch, or provide flax_model.msgpack or model.safetensors)"
      ) from e
    paths = [get(_BIN)] if get(_BIN) else shards(_BIN_INDEX)
    state = {}
    for p in paths:
      sd = torch.load(p, map_location="cpu", weights_only=True)
      state.update(
        {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
      )
    return {"format": "pt", "state": state}
  raise ValueError(
    f"{where} has a CLIP config.json but no weights: expected one of {_FLAX}, {_SAFE}, {_BIN} "
    "(or their sharded .index.json)"
  )


def load_clip(path_or_name: str, dtype: Any = jnp.float32) -> tuple[Any, dict]:
  """Loads a CLIP checkpoint as transformers' Flax CLIP and its parameters.

  Flax weights are read directly; PyTorch weights (safetensors, or ``.bin`` when torch is installed)
  are converted with transformers' PyTorch-to-Flax key mapping. Sharded checkpoints are supported.

  Args:
    path_or_name: a local checkpoint directory or a Hugging Face hub name (e.g.
      ``openai/clip-vit-large-patch14-336``; the cache is used when ``HF_HUB_OFFLINE=1``).
    dtype: computation dtype of the model; floating parameters are cast to it as well.

  Returns:
    ``(model, params)``: a ``FlaxCLIPModel`` (``config.model_type == "clip"``) or a
    ``FlaxCLIPVisionModel`` (``"clip_vision_model"``, e.g. a LLaVA vision tower) created without
    random initialisation, and its parameter tree on the default device.

  Raises:
    ValueError: not a CLIP checkpoint (no config.json, another model_type, missing weights or
      parameters of the wrong shape).
    ImportError: only ``.bin`` weights exist and torch is not installed.
  """
  where = f"CLIP checkpoint {path_or_name!r}"
  get = _file_getter(path_or_name)
  config_file = get("config.json")
  if config_file is None:
    hint = (
      ""
      if os.path.isdir(path_or_name)
      else " (not a local directory, and not in the hub cache or online)"
    )
    raise ValueError(f"{where} is not a CLIP checkpoint: no config.json found{hint}")
  with open(config_file) as f:
    model_type = json.load(f).get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(
      f"{where} is not a CLIP checkpoint: config.json has model_type={model_type!r}, "
      f"expected one of {sorted(_MODEL_TYPES)}"
    )
  config_cls, model_cls = _MODEL_TYPES[model_type]
  config = config_cls.from_json_file(config_file)
  model = model_cls(config, dtype=dtype, _do_init=False)
  expected = flatten_dict(dict(model.params_shape_tree))

  loaded = _read_state(get, where)
  if loaded["format"] == "pt":
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    shim = type(
      "_Shapes",
      (),
      {"params": dict(model.params_shape_tree), "base_model_prefix": model.base_model_prefix},
    )()
    state = flatten_dict(convert_pytorch_state_dict_to_flax(loaded["state"], shim))
  else:
    state = loaded["state"]
  missing = sorted(".".join(k) for k in expected if k not in state)
  if missing:
    raise ValueError(
      f"{where}: {len(missing)} parameters missing from the weights, e.g. {missing[:5]}"
    )
  params = {}
  for key, spec in expected.items():
    value = state[key]
    if tuple(value.shape) != tuple(spec.shape):
      raise ValueError(
        f"{where}: parameter {'.'.join(key)} has shape {tuple(value.shape)}, "
        f"config expects {tuple(spec.shape)}"
      )
    value = jnp.asarray(value)
    params[key] = value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value
  return model, unflatten_dict(params)
