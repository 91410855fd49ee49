"""Oracles for ``conv_impl="onednn"`` (``fedllava/models/onednn_conv.py``).

oneDNN computes in float32, so each of its three outputs (the forward, the input gradient, the
kernel gradient) is checked against XLA's convolution and autodiff run in float64 on the same
float32 inputs: only oneDNN's float32 rounding may separate them.
"""

import os
import platform
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedllava import errors
from fedllava.models import onednn_conv, resnet

needs_onednn = pytest.mark.skipif(
  not onednn_conv.available(), reason=f"oneDNN unavailable: {onednn_conv.unavailable_reason()}"
)


def test_onednn_is_here_where_requirements_pin_it():
  """requirements.txt pins oneDNN on Linux x86-64, so there the tests below must run, not skip."""
  if sys.platform.startswith("linux") and platform.machine() == "x86_64":
    assert onednn_conv.available(), onednn_conv.unavailable_reason()


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@needs_onednn
@pytest.mark.parametrize(
  "n, hw, cin, cout, k, stride",
  [(3, 9, 3, 4, 3, 1), (3, 8, 4, 6, 3, 2), (2, 9, 4, 6, 3, 2), (3, 8, 4, 6, 1, 2),
   (2, 7, 3, 5, 7, 2), (1, 6, 5, 5, 1, 1), (4, 32, 16, 32, 3, 2), (2, 8, 64, 64, 3, 1)],
)  # fmt: skip
def test_forward_and_both_gradients_equal_float64_xla(x64, n, hw, cin, cout, k, stride):
  """Strides 1 and 2, odd and even sizes, 1x1 / 3x3 / ResNet-50's 7x7 stem, batch 1, and
  ResNet-8's widths, where oneDNN picks its blocked kernels."""
  rng = np.random.default_rng(0)
  pad = (k - 1) // 2
  x = jnp.asarray(rng.normal(size=(n, hw, hw, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)

  def ref(x, w):
    return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  y64, vjp64 = jax.vjp(ref, x.astype(jnp.float64), w.astype(jnp.float64))
  y, vjp = jax.vjp(lambda x, w: onednn_conv.conv(x, w, stride, pad), x, w)
  assert y.dtype == jnp.float32 and y.shape == y64.shape
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  dx64, dw64 = vjp64(dy.astype(jnp.float64))
  dx, dw = vjp(dy)
  assert (dx.shape, dw.shape) == (x.shape, w.shape)
  for ours, exact in [(y, y64), (dx, dx64), (dw, dw64)]:
    assert _rel(ours, exact) < 2e-6, _rel(ours, exact)


@needs_onednn
@pytest.mark.parametrize(
  "n, hw, cin, cout, k, stride", [(3, 9, 3, 4, 3, 1), (4, 32, 16, 32, 3, 2), (2, 8, 64, 64, 3, 1),
                                  (3, 8, 4, 6, 1, 2), (2, 7, 3, 5, 7, 2)]
)  # fmt: skip
def test_bfloat16_is_float32_accumulation_rounded_once(x64, n, hw, cin, cout, k, stride):
  """bfloat16 operands: each output within one bfloat16 rounding (2^-8 relative) of the float64
  convolution of the same bfloat16 values, as XLA's own bfloat16 convolution is; float32
  accumulation inside (a bfloat16 one would drift by ~sqrt(9 C) roundings)."""
  rng = np.random.default_rng(2)
  pad = (k - 1) // 2
  bf = lambda a: jnp.asarray(a, jnp.float32).astype(jnp.bfloat16)  # noqa: E731
  x, w = bf(rng.normal(size=(n, hw, hw, cin))), bf(rng.normal(size=(k, k, cin, cout)))

  def ref(x, w):
    return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  y64, vjp64 = jax.vjp(ref, x.astype(jnp.float64), w.astype(jnp.float64))
  y, vjp = jax.vjp(lambda x, w: onednn_conv.conv(x, w, stride, pad), x, w)
  dy = bf(rng.normal(size=y.shape))
  dx, dw = vjp(dy)
  assert {y.dtype, dx.dtype, dw.dtype} == {jnp.dtype(jnp.bfloat16)}
  for ours, exact in [
    (y, y64),
    (dx, vjp64(dy.astype(jnp.float64))[0]),
    (dw, vjp64(dy.astype(jnp.float64))[1]),
  ]:
    err = np.abs(np.asarray(ours, np.float64) - np.asarray(exact))
    assert np.all(err <= 2.0**-8 * np.abs(np.asarray(exact)) + 1e-6 * np.abs(exact).max()), (
      err.max()
    )


@needs_onednn
def test_inside_jitted_scan_and_vmap_over_clients():
  """Local steps as a ``lax.scan`` (where XLA:CPU's own gradient convolutions fall off Eigen)
  and per-client kernels under ``vmap`` (a loop of calls): the same as XLA's, float32."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)) * 0.3, jnp.float32)
  xla = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
    x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )  # fmt: skip
  ours = lambda x, w: onednn_conv.conv(x, w, 2, 1)  # noqa: E731

  def steps(conv):
    def body(w, xi):
      return w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.sin(conv(xi, w))))(w), None

    return jax.jit(lambda w: jax.lax.scan(body, w, x)[0])(w)

  np.testing.assert_allclose(steps(ours), steps(xla), rtol=1e-4, atol=1e-5)
  ws = jnp.stack([w, -2 * w])
  gv = lambda f: jax.jit(jax.vmap(jax.grad(lambda w, xi: jnp.sum(f(xi, w) ** 2))))(ws, x)  # noqa: E731
  np.testing.assert_allclose(gv(ours), gv(xla), rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("name, hw", [("resnet8", 16), ("resnet50", 32)])
def test_model_gradients_equal_float64_xla_model(x64, name, hw):
  """A whole train-mode forward + backward (BN with a mask) of ResNet-8 / ResNet-50 with
  ``conv_impl="onednn"`` in float32 against the same parameters with XLA's convolutions in
  float64. BN's backward cancels, so float32 itself drifts from float64 (to 7% on a deep
  ResNet-50 leaf here); the bound is float32 ``eigen``'s own error, measured alongside."""
  mk = lambda impl, dtype: resnet.create_model(  # noqa: E731
    ml_collections.ConfigDict(dict(name=name, width=4, dtype=dtype, conv_impl=impl)), 5
  )
  x = np.random.default_rng(0).normal(size=(4, hw, hw, 3))
  mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])
  exact = mk("xla", "float64")
  v64 = exact.init(jax.random.PRNGKey(0), x)
  v32 = jax.tree.map(lambda a: a.astype(jnp.float32), v64)

  def grads(model, v, dtype):
    def loss(params):
      out, _ = model.apply(
        {"params": params, "batch_stats": v["batch_stats"]}, x.astype(dtype), train=True,
        mask=mask.astype(dtype), mutable=["batch_stats"],
      )  # fmt: skip
      return jnp.sum(out["logits"] ** 2 * mask.astype(dtype)[:, None])

    return jax.grad(loss)(v["params"])

  g64 = grads(exact, v64, jnp.float64)
  errs = {}
  for impl in ("onednn", "eigen"):
    model = mk(impl, "float32")
    assert jax.tree.structure(model.init(jax.random.PRNGKey(0), x.astype(np.float32))) == (
      jax.tree.structure(v64)
    )
    g = grads(model, v32, jnp.float32)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    errs[impl] = max(_rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g64)))
  assert errs["eigen"] < 0.2, errs  # float32 is near float64 at all
  assert errs["onednn"] < 3 * errs["eigen"] + 1e-5, errs


def test_auto_picks_onednn_for_float32_and_bfloat16_on_cpu(monkeypatch):
  f32, f64, bf16 = jnp.float32, jnp.float64, jnp.bfloat16
  monkeypatch.setattr(onednn_conv, "available", lambda: True)
  assert resnet.resolve_conv_impl("auto", f32) == "onednn"
  assert resnet.resolve_conv_impl("auto", f64) == "eigen"  # the float64 oracles
  assert resnet.resolve_conv_impl("auto", bf16) == "onednn"
  assert resnet.resolve_conv_impl("eigen", f32) == "eigen"
  monkeypatch.setattr(onednn_conv, "available", lambda: False)
  assert resnet.resolve_conv_impl("auto", f32) == "eigen"
  assert resnet.resolve_conv_impl("auto", bf16) == "eigen"
  with pytest.raises(ValueError, match="conv_impl='onednn' computes in float32 or bfloat16"):
    resnet.resolve_conv_impl("onednn", f64)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resnet.resolve_conv_impl("auto", f32) == "xla"


def _model_config(**kw):
  base = dict(
    name="resnet8", width=4, mlp_dim=None, head_on_mlp=False, dtype="float32",
    compute_dtype="float32", conv_impl="onednn", bn_impl="reduce",
  )  # fmt: skip
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_bad_onednn_configs_are_one_message_naming_the_field_and_fix(monkeypatch, tmp_path):
  with pytest.raises(
    errors.ConfigError, match=r"config.model.conv_impl='onednn' computes in float32"
  ):
    resnet.validate(_model_config(dtype="float64", compute_dtype="float64"))
  with pytest.raises(
    errors.ConfigError, match="conv_impl='onednn' computes in float32 or bfloat16"
  ):
    resnet.validate(_model_config(dtype="float64"))  # float32 compute of float64 is float64
  resnet.validate(_model_config(compute_dtype="bfloat16"))  # mixed precision: allowed
  resnet.validate(_model_config(dtype="bfloat16"))  # the legacy spelling of the same
  monkeypatch.setenv("FEDLLAVA_ONEDNN_ROOT", str(tmp_path))  # a root with no oneDNN in it
  with pytest.raises(
    errors.ConfigError, match=r"cannot run here: no oneDNN headers.*pip install onednn-cpu-gomp"
  ):
    resnet.validate(_model_config())
  monkeypatch.setenv("CXX", "")
  monkeypatch.setenv("PATH", str(tmp_path))  # no compiler either: named first
  with pytest.raises(errors.ConfigError, match="no C\\+\\+ compiler"):
    resnet.validate(_model_config())


@needs_onednn
def test_wrong_operands_are_refused_before_the_call():
  x, w = jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 4, 5))
  with pytest.raises(ValueError, match=r"x \[B, H, W, C\] and w \[KH, KW, C, O\]"):
    onednn_conv.conv(x, w, 1, 1)  # 3 input channels, a kernel for 4
  with pytest.raises(TypeError, match="float32 or bfloat16 operands of one dtype"):
    onednn_conv.conv(x, jnp.zeros((3, 3, 3, 5), jnp.bfloat16), 1, 1)


@needs_onednn
def test_library_is_built_once_per_source_and_a_failed_build_says_why(monkeypatch, tmp_path):
  found, _ = onednn_conv._find()
  monkeypatch.setenv("FEDLLAVA_CACHE_DIR", str(tmp_path / "cache"))
  path = onednn_conv._build(found)
  assert os.path.dirname(path) == str(tmp_path / "cache" / "onednn")
  stamp = os.stat(path).st_mtime_ns
  assert onednn_conv._build(found) == path and os.stat(path).st_mtime_ns == stamp  # cached
  monkeypatch.setenv("FEDLLAVA_CACHE_DIR", str(tmp_path / "other"))
  broken = dict(found, cxx="false")  # a compiler that fails; a new cache dir, so it must build
  with pytest.raises(RuntimeError, match="building the oneDNN convolution library failed"):
    onednn_conv._build(broken)
  assert os.listdir(tmp_path / "other" / "onednn") == []  # no half-written library left
