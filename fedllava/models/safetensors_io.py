"""safetensors files read into numpy without torch, memory-mapped, bfloat16 included.

A file is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets"}}`` with an optional ``"__metadata__"`` entry of strings, then the tensors' raw
little-endian bytes. Reading those bytes directly (``ml_dtypes`` for bfloat16 and float8) gives
every dtype, where safetensors' own numpy path cannot produce bfloat16.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def _read_json_header(file) -> tuple[dict, int]:
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), 8 + n


def read_header(file) -> tuple[dict, int]:
  """Reads a safetensors header.

  Args:
    file: path of a ``.safetensors`` file.

  Returns:
    ``(header, data_start)``: ``{name: {"dtype", "shape", "data_offsets"}}`` without the
    ``"__metadata__"`` entry, and the byte offset at which the tensor data starts.
  """
  header, data_start = _read_json_header(file)
  header.pop("__metadata__", None)
  return header, data_start


def read_tensor(file, info: dict, data_start: int, mm=None) -> np.ndarray:
  """Reads one tensor from its raw bytes, without a copy (a view of the memory-mapped file).

  Args:
    file: path of the ``.safetensors`` file.
    info: the tensor's header entry (``read_header``).
    data_start: the byte offset of the data (``read_header``).
    mm: the file as ``np.memmap(file, np.uint8, mode="r")``, to map it once for many tensors.

  Returns:
    the tensor with its stored dtype and shape (bfloat16 as ``ml_dtypes.bfloat16``).
  """
  start, end = info["data_offsets"]
  mm = np.memmap(file, dtype=np.uint8, mode="r") if mm is None else mm
  raw = np.asarray(mm[data_start + start : data_start + end])
  return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_file(file) -> tuple[dict, dict]:
  """Reads every tensor of a safetensors file, and its metadata.

  Args:
    file: path of a ``.safetensors`` file.

  Returns:
    ``(tensors, metadata)``: ``{name: np.ndarray}`` (views of the memory-mapped file) and the
    ``"__metadata__"`` strings (``{}`` when there are none), e.g. ``{"format": "pt"}``.
  """
  header, data_start = _read_json_header(file)
  metadata = header.pop("__metadata__", None) or {}
  mm = np.memmap(file, dtype=np.uint8, mode="r")
  return {k: read_tensor(file, info, data_start, mm) for k, info in header.items()}, metadata
