"""Convolutions on oneDNN for XLA:CPU: ``conv(x, w, stride, pad)``, ``conv_impl="onednn"``.

Why: on a CPU the FL round is convolution-bound, and XLA:CPU's convolutions at ResNet-8's
widths (16-64 channels) run 1.7x slower than oneDNN's, which PyTorch uses
(``benchmarks/conv_cpu.py``). Here the forward, the input gradient and the kernel gradient
are oneDNN primitives called as XLA FFI custom calls (``onednn_conv.cc``), so a jitted,
scanned, vmapped round calls them like any other op: NHWC activations in place, HWIO kernels
reordered to oneDNN's blocked layout per call (a few KB).

The library is compiled from ``onednn_conv.cc`` on first use (one ``g++`` call, about 2 s)
into ``$FEDLLAVA_CACHE_DIR`` (default ``~/.cache/fedllava``), keyed by the source, the
compiler and the oneDNN / XLA headers, and loaded once per process. It needs:

* oneDNN's library and headers: ``pip install onednn-cpu-gomp onednn-devel-cpu-gomp`` (in
  ``requirements.txt`` on Linux x86-64), or a oneDNN (3.x, CPU runtime) install named by
  ``$FEDLLAVA_ONEDNN_ROOT`` (``lib/``, ``include/``);
* a C++17 compiler (``$CXX``, else ``g++`` / ``c++``).

PyPI's ``onednn`` (2024+) is a SYCL build whose CPU engine needs Intel's OpenCL runtime and
2 GB of dependencies; ``onednn-cpu-gomp`` is oneDNN 3.2 on GNU OpenMP (40 MB, only
``libgomp``), so that is the one pinned. Its threads follow ``OMP_NUM_THREADS`` and the
process's CPU affinity.

Numerics: each convolution is a float32 sum in a different order than XLA's, so results
agree with ``conv_impl="eigen"`` to float32 rounding (``tests/test_onednn_conv.py`` checks
all three against XLA's convolution in float64). bfloat16 operands (``compute_dtype=
"bfloat16"``, mixed precision) accumulate in float32 inside oneDNN and round the result to
bfloat16, as XLA's bfloat16 convolution does. float64 (the oracles) stays on ``eigen``, which
``conv_impl="auto"`` picks for it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
_TARGETS = {
  "forward": "FedllavaOnednnConvFwd",
  "input_gradient": "FedllavaOnednnConvBwdData",
  "kernel_gradient": "FedllavaOnednnConvBwdWeights",
}
_TARGETS.update({f"{k}_bf16": f"{v}Bf16" for k, v in _TARGETS.items()})
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_LOCK = threading.Lock()
_LOADED: dict = {}
INSTALL_HINT = (
  "install oneDNN with `pip install onednn-cpu-gomp onednn-devel-cpu-gomp` (requirements.txt) "
  "and a C++17 compiler "
  "(g++), or set FEDLLAVA_ONEDNN_ROOT to a oneDNN install; or use conv_impl='eigen'"
)


def _roots() -> list[str]:
  env = os.environ.get("FEDLLAVA_ONEDNN_ROOT")
  return [env] if env else [sys.prefix, "/usr/local", "/usr"]


def _find() -> tuple[Optional[dict], str]:
  """``({"root", "include", "lib", "cxx"}, "")`` or ``(None, why not)``."""
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not cxx:
    return None, "no C++ compiler (g++, c++ or $CXX) on PATH"
  for root in _roots():
    header = os.path.join(root, "include", "oneapi", "dnnl", "dnnl.hpp")
    libs = glob.glob(os.path.join(root, "lib*", "libdnnl.so*"))
    if os.path.exists(header) and libs:
      return {
        "root": root,
        "include": os.path.join(root, "include"),
        "lib": os.path.dirname(sorted(libs)[0]),
        "cxx": cxx,
      }, ""
  return (
    None,
    f"no oneDNN headers + library (include/oneapi/dnnl/dnnl.hpp, lib/libdnnl.so) under {_roots()}",
  )


def unavailable_reason() -> str:
  """Why ``conv_impl="onednn"`` cannot run here ("" when it can)."""
  if jax.default_backend() != "cpu":
    return f"oneDNN convolutions are for XLA:CPU; the default backend is {jax.default_backend()!r}"
  return _find()[1]


def available() -> bool:
  """Whether oneDNN, its headers and a compiler are here (the library may not be built yet)."""
  return not unavailable_reason()


def _cache_dir() -> str:
  base = os.environ.get("FEDLLAVA_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedllava"
  )
  return os.path.join(base, "onednn")


def _build(found: dict) -> str:
  """Compiles ``onednn_conv.cc`` (once per source/toolchain) and returns the library's path."""
  ffi_include = jax.ffi.include_dir()
  with open(_SOURCE, "rb") as f:
    key = hashlib.sha256(f.read())
  for part in (found["cxx"], found["include"], found["lib"], ffi_include, jax.__version__):
    key.update(part.encode())
  version = os.path.join(found["include"], "oneapi", "dnnl", "dnnl_version.h")
  if os.path.exists(version):
    with open(version, "rb") as f:
      key.update(f.read())
  out_dir = _cache_dir()
  path = os.path.join(out_dir, f"libfedllava_onednn_{key.hexdigest()[:16]}.so")
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [
    found["cxx"], "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
    f"-I{ffi_include}", f"-I{found['include']}", _SOURCE,
    f"-L{found['lib']}", "-ldnnl",
    # DT_RPATH (not RUNPATH): libdnnl's own dependencies resolve from its directory too.
    f"-Wl,--disable-new-dtags,-rpath,{found['lib']}",
    "-o", tmp,
  ]  # fmt: skip
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(
        f"building the oneDNN convolution library failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
      )
    os.replace(tmp, path)  # atomic: concurrent builders (xdist workers) each write their own tmp
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load() -> str:
  """Builds (if needed), loads and registers the custom calls; returns the library's path."""
  with _LOCK:
    if "path" in _LOADED:
      return _LOADED["path"]
    found, why = _find()
    if found is None:
      raise RuntimeError(f"conv_impl='onednn' cannot run: {why}; {INSTALL_HINT}.")
    path = _build(found)
    lib = ctypes.CDLL(path)
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(
        f"fedllava_onednn_conv_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
      )
    _LOADED["path"], _LOADED["lib"] = path, lib
    return path


def _out_size(n: int, k: int, stride: int, pad: int) -> int:
  return (n + 2 * pad - k) // stride + 1


def _call(name: str, shape, *args, stride: int, pad: int):
  load()
  dtype = jnp.dtype(args[0].dtype)
  if dtype not in DTYPES or any(a.dtype != dtype for a in args):
    raise TypeError(
      f"oneDNN convolutions take float32 or bfloat16 operands of one dtype (got "
      f"{[str(a.dtype) for a in args]}); use conv_impl='eigen'."
    )
  suffix = "_bf16" if dtype == jnp.bfloat16 else ""
  return jax.ffi.ffi_call(
    f"fedllava_onednn_conv_{name}{suffix}",
    jax.ShapeDtypeStruct(shape, dtype),
    # Under vmap (clients as a batch axis with per-client kernels) a loop of calls: each is
    # already a whole batch of examples, and the CPU strategies map over clients anyway.
    vmap_method="sequential",
  )(*args, stride=np.int64(stride), pad=np.int64(pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, w: jax.Array, stride: int, pad: int) -> jax.Array:
  """A 2-D convolution, ``y[b, i, j, o] = sum_{di, dj, c} xpad[b, s i + di, s j + dj, c] w[di, dj, c, o]``.

  Args:
    x: ``[B, H, W, C]`` activations (NHWC), float32 or bfloat16.
    w: ``[KH, KW, C, O]`` kernel (HWIO, flax's layout), ``x``'s dtype.
    stride: the stride on both axes.
    pad: zeros added on every side of both axes (PyTorch's ``padding``).
  Returns:
    ``[B, Ho, Wo, O]`` with ``Ho = (H + 2 pad - KH) // stride + 1``; differentiable in ``x`` and
    ``w`` through oneDNN's backward-data and backward-weights primitives.
  """
  if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
    raise ValueError(
      f"onednn_conv.conv takes x [B, H, W, C] and w [KH, KW, C, O]; got {x.shape} and {w.shape}."
    )
  ho = _out_size(x.shape[1], w.shape[0], stride, pad)
  wo = _out_size(x.shape[2], w.shape[1], stride, pad)
  return _call("forward", (x.shape[0], ho, wo, w.shape[3]), x, w, stride=stride, pad=pad)


def _conv_fwd(x, w, stride, pad):
  return conv(x, w, stride, pad), (x, w)


def _conv_bwd(stride, pad, res, dy):
  x, w = res
  dx = _call("input_gradient", x.shape, dy, w, stride=stride, pad=pad)
  dw = _call("kernel_gradient", w.shape, x, dy, stride=stride, pad=pad)
  return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)
