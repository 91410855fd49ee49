"""Flax ResNets for the FL model g_fl: CReFF's ResNet-8 (CIFAR) and ResNet-50 (ImageNet).

Numerics follow PyTorch, because the paper's numbers come from CReFF's PyTorch code
(see DESIGN.md, "The CReFF protocol, as its code does it"):

* convolutions pad explicitly ``(k - 1) // 2`` on each side; XLA's "SAME" pads stride-2
  3x3 convolutions (0, 1) and shifts every window;
* batch norm is PyTorch's: eps 1e-5, momentum 0.1, the running variance takes the
  *unbiased* batch variance, and batch statistics can be restricted to a mask of valid
  examples (the last partial batch of an epoch is padded to a fixed shape);
* initialisation: convolutions He normal with fan-out, BN scale 1 / bias 0, the
  classifier PyTorch's default ``Linear`` init U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

Every model returns a dict with ``feature_map`` (the last spatial map, needed by stage 1),
``features`` (the pooled vector) and ``logits``; ``tokens`` (the feature map mapped by the
feature MLP to the teacher's width, Eq. 2's g_fl(x)) is present when ``mlp_dim`` is set.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedllava import errors
from fedllava.models import onednn_conv


def conv_init(key, shape, dtype=jnp.float32):
  """He normal with fan-out, as CReFF's ``normal_(0, sqrt(2 / (k * k * out)))``."""
  kh, kw, _, out = shape
  return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (kh * kw * out))


def _param_dtype(module) -> Any:
  """A module's parameter (master-weight) dtype: ``param_dtype``, else ``dtype`` widened to f32."""
  pd = getattr(module, "param_dtype", None)
  return jnp.promote_types(module.dtype, jnp.float32) if pd is None else jnp.dtype(pd)


def torch_linear_init(fan_in: int) -> Callable:
  """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class BatchNorm(nn.Module):
  """Batch norm with PyTorch's semantics and an optional per-example mask.

  In training mode the batch is normalised with its biased variance, and the running
  statistics move as ``r <- (1 - m) r + m * s`` with momentum ``m`` (PyTorch's 0.1) and
  ``s`` the batch mean, or the *unbiased* batch variance ``var * n / (n - 1)`` with
  ``n = valid examples * H * W``. Examples whose mask is 0 take no part in either.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32  # the output (activation) dtype
  param_dtype: Any = None  # scale/bias and running statistics; None: dtype widened to f32
  # How the batch statistics are summed: "reduce" (XLA reductions) or "dot" (contractions
  # with the example weights as matrix-vector products, precision HIGHEST). Same values up to rounding (float64 tests); ``config.model.bn_impl``. Measured:
  # 3% faster local steps on CPU (benchmarks/README.md), so "reduce" stays the default.
  stats: str = "reduce"

  @nn.compact
  def __call__(self, x, train: bool, mask: Optional[jax.Array] = None):
    features = x.shape[-1]
    pd = _param_dtype(self)
    scale = self.param("scale", nn.initializers.ones, (features,), pd)
    bias = self.param("bias", nn.initializers.zeros, (features,), pd)
    stat_dtype = jnp.promote_types(pd, jnp.float32)
    # Statistics and normalisation in >= float32 even for bfloat16 activations (mixed precision).
    x = x.astype(jnp.promote_types(x.dtype, stat_dtype))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), stat_dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), stat_dtype))
    if not train:
      mean, var = ra_mean.value, ra_var.value
    else:
      w = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask.astype(x.dtype)
      n = jnp.sum(w) * np.prod(x.shape[1:-1])
      if self.stats == "dot":
        x3 = x.reshape(x.shape[0], -1, features)
        hp = jax.lax.Precision.HIGHEST
        mean = jnp.einsum("b,bpc->c", w, x3, precision=hp) / jnp.maximum(n, 1.0)
        var = jnp.einsum("b,bpc->c", w, jnp.square(x3 - mean), precision=hp)
        var = var / jnp.maximum(n, 1.0)
      else:
        axes = tuple(range(x.ndim - 1))
        w = w.reshape(w.shape + (1,) * (x.ndim - 1))
        mean = jnp.sum(x * w, axis=axes) / jnp.maximum(n, 1.0)
        var = jnp.sum(w * jnp.square(x - mean), axis=axes) / jnp.maximum(n, 1.0)
      if not self.is_initializing():
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    y = (x - mean.astype(x.dtype)) * jax.lax.rsqrt(var.astype(x.dtype) + self.epsilon)
    return (y * scale.astype(x.dtype) + bias.astype(x.dtype)).astype(self.dtype)


def shifted_patches(x: jax.Array, k: int, stride: int, pad: int) -> jax.Array:
  """im2col by data movement: the k*k strided windows of the padded input, concatenated.

  ``[B, H, W, C] -> [B, Ho, Wo, k * k * C]``, features ordered (kh, kw, C), so an HWIO kernel
  reshaped to ``[k * k * C, F]`` multiplies it directly. Its backward is pads and adds, where
  ``conv_general_dilated_patches`` is a convolution with a one-hot kernel both ways.
  """
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (x.shape[1] + 2 * pad - k) // stride + 1
  wo = (x.shape[2] + 2 * pad - k) // stride + 1
  windows = [
    xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
    for i in range(k)
    for j in range(k)
  ]
  return jnp.concatenate(windows, axis=-1)


class Im2ColConv(nn.Module):
  """A bias-free convolution as patches x kernel: the same parameters as ``nn.Conv``.

  Why: under ``vmap`` over clients, each client has its own kernel and XLA lowers a
  batched ``nn.Conv`` to a grouped convolution, which is slow on GPUs (JAX #26568, #13800);
  here the per-client kernels become one batched matrix multiply instead.
  """

  features: int
  kernel_size: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = None
  patches: str = "conv"  # "conv": conv_general_dilated_patches; "shift": k*k strided slices

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    pad = (k - 1) // 2
    kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), _param_dtype(self))
    x = x.astype(self.dtype)
    if self.patches == "shift" and k > 1:  # patch features ordered (kh, kw, C): HWIO as is
      return jnp.einsum(
        "bhwk,kf->bhwf",
        shifted_patches(x, k, self.stride, pad),
        kernel.reshape(-1, self.features).astype(self.dtype),
      )
    if k == 1:
      patches = x[:, :: self.stride, :: self.stride, :]
      w = kernel.reshape(-1, self.features)
    else:  # patch features are ordered (C, kh, kw)
      patches = jax.lax.conv_general_dilated_patches(
        x,
        (k, k),
        (self.stride, self.stride),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      w = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, self.features)
    return jnp.einsum("bhwk,kf->bhwf", patches, w.astype(self.dtype))


_DN = ("NHWC", "HWIO", "NHWC")


def _conv_fwd_only(x, w, stride: int, pad: int):
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), ((pad, pad), (pad, pad)), None, None, _DN
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def eigen_conv(x: jax.Array, w: jax.Array, stride: int, pad: int) -> jax.Array:
  """XLA's convolution whose two gradients are written as forward-form convolutions.

  Why: XLA:CPU hands a convolution to Eigen only in its canonical form (``b01f_01io->b01f``).
  Inside a ``while`` loop (our scan over local steps) the gradient convolutions that autodiff
  emits stay non-canonical (``f01b_i01o->01bf``) and run as XLA's naive loop nest: 20-70x
  slower than Eigen (``benchmarks/README.md``). Here the input gradient is a stride-1 convolution
  of the (stride-dilated) output gradient with the flipped, transposed kernel, and the kernel
  gradient a convolution of the input (channels as batch) with the output gradient as kernel
  (``rhs_dilation`` = stride): both canonical, both Eigen. In float64 the gradients are
  bit-identical to autodiff's (``tests/test_resnet.py``).
  """
  return _conv_fwd_only(x, w, stride, pad)


def _eigen_conv_fwd(x, w, stride, pad):
  return _conv_fwd_only(x, w, stride, pad), (x, w)


def _eigen_conv_bwd(stride, pad, res, dy):
  x, w = res
  k, (h, wd), (ho, wo) = w.shape[0], x.shape[1:3], dy.shape[1:3]
  s, p = stride, pad
  # dx: transposed convolution = lhs-dilated convolution with the flipped, io-swapped kernel;
  # the high padding restores the rows/columns the forward's stride dropped.
  wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  hi = lambda n, no: k - 1 - p + n - ((no - 1) * s + k - 2 * p)  # noqa: E731
  dx = jax.lax.conv_general_dilated(
    dy, wt, (1, 1), ((k - 1 - p, hi(h, ho)), (k - 1 - p, hi(wd, wo))), (s, s), None, _DN
  )
  # dw[i, j, c, f] = sum_{b, y, x} xpad[b, y * s + i, x * s + j, c] dy[b, y, x, f]: the input
  # with channels as batch and examples as features, the output gradient as the kernel.
  hi_w = lambda n, no: k - n - p + (no - 1) * s  # noqa: E731
  dw = jax.lax.conv_general_dilated(
    x.transpose(3, 1, 2, 0),
    dy.transpose(1, 2, 0, 3),
    (1, 1),
    ((p, hi_w(h, ho)), (p, hi_w(wd, wo))),
    None,
    (s, s),
    _DN,
  )
  return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


eigen_conv.defvjp(_eigen_conv_fwd, _eigen_conv_bwd)


class FunctionConv(nn.Module):
  """A bias-free convolution through ``conv(x, kernel, stride, pad)`` (``eigen_conv`` or
  ``onednn_conv.conv``): the same parameters as ``nn.Conv``."""

  features: int
  kernel_size: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = None
  conv: Callable = eigen_conv

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), _param_dtype(self))
    return self.conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, (k - 1) // 2)


CONV_IMPLS = ("xla", "im2col", "shift", "eigen", "onednn")
BN_IMPLS = ("reduce", "dot")


def _conv(
  features: int, kernel: int, stride: int, name: str, dtype, impl: str = "xla", param_dtype=None
):
  pd = jnp.promote_types(dtype, jnp.float32) if param_dtype is None else param_dtype
  if impl in ("im2col", "shift"):
    patches = "shift" if impl == "shift" else "conv"
    return Im2ColConv(
      features, kernel, stride, dtype=dtype, param_dtype=pd, patches=patches, name=name
    )
  if impl in ("eigen", "onednn"):
    fn = eigen_conv if impl == "eigen" else onednn_conv.conv
    return FunctionConv(features, kernel, stride, dtype=dtype, param_dtype=pd, conv=fn, name=name)
  pad = (kernel - 1) // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=conv_init,
    dtype=dtype,
    param_dtype=pd,
    name=name,
  )


def _conv_bn(block, x, features, kernel, stride, index, train, mask, prefix=""):
  """``conv{index}`` then ``bn{index}`` as submodules of ``block`` (named as before)."""
  pd = _param_dtype(block)
  x = _conv(features, kernel, stride, f"{prefix}conv{index}", block.dtype, block.conv_impl, pd)(x)
  bn = BatchNorm(dtype=block.dtype, param_dtype=pd, stats=block.bn_impl, name=f"{prefix}bn{index}")
  return bn(x, train, mask)


def _shortcut(block, x, features, train, mask):
  """Identity, or a 1x1 conv + BN (``downsample_*``) when the shape changes."""
  if block.stride == 1 and x.shape[-1] == features:
    return x
  return _conv_bn(block, x, features, 1, block.stride, "", train, mask, prefix="downsample_")


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual; 1x1 conv + BN shortcut when the shape changes."""

  features: int
  stride: int
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  param_dtype: Any = None
  bn_impl: str = "reduce"

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    y = nn.relu(_conv_bn(self, x, self.features, 3, self.stride, 1, train, mask))
    y = _conv_bn(self, y, self.features, 3, 1, 2, train, mask)
    return nn.relu(_shortcut(self, x, self.features, train, mask) + y)


class Bottleneck(nn.Module):
  """ResNet-50 bottleneck (torchvision v1.5: the stride sits on the 3x3 convolution)."""

  features: int
  stride: int
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  param_dtype: Any = None
  bn_impl: str = "reduce"

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    y = nn.relu(_conv_bn(self, x, self.features, 1, 1, 1, train, mask))
    y = nn.relu(_conv_bn(self, y, self.features, 3, self.stride, 2, train, mask))
    y = _conv_bn(self, y, self.features * 4, 1, 1, 3, train, mask)
    return nn.relu(_shortcut(self, x, self.features * 4, train, mask) + y)


class FeatureMLP(nn.Module):
  """Per-token MLP from the backbone's channels to the teacher's width (the paper's added MLP)."""

  hidden: int
  out: int
  dtype: Any = jnp.float32
  param_dtype: Any = None

  @nn.compact
  def __call__(self, x):
    pd = _param_dtype(self)
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=pd, name="fc1")(x)
    return nn.Dense(self.out, dtype=self.dtype, param_dtype=pd, name="fc2")(
      nn.gelu(x, approximate=False)
    )


class ResNet(nn.Module):
  """A ResNet backbone + pooled features + linear classifier (+ optional feature MLP).

  Attributes:
    stage_sizes: blocks per stage.
    block: ``BasicBlock`` or ``Bottleneck``.
    width: channels of the first stage (CReFF's ResNet-8: 16 * scaling 4 = 64).
    num_classes: classifier outputs.
    stem: ``"cifar"`` (3x3 conv, stride 1) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool).
    conv_impl: ``"xla"`` (``nn.Conv``), ``"im2col"`` (same parameters, batched-matmul
      friendly under ``vmap``; see ``Im2ColConv``), ``"shift"`` (im2col whose patches are
      strided slices, ``shifted_patches``), ``"eigen"`` (XLA's convolutions with gradients
      XLA:CPU keeps on Eigen inside a scan, ``eigen_conv``) or ``"onednn"`` (oneDNN's
      convolutions as FFI custom calls, ``onednn_conv.conv``: float32 / bfloat16, the fastest on CPU,
      ``auto``'s choice there when installed; see ``resolve_conv_impl``).
    mlp_dim: width of the feature MLP's output (CLIP's width); ``None`` for no MLP.
    head_on_mlp: classify the pooled MLP tokens instead of the pooled backbone features.
    dtype: the computation (activation) dtype; bfloat16 = mixed precision.
    param_dtype: parameters and BN statistics (master weights); ``None``: ``dtype`` widened
      to float32. BN statistics, the pooled features and the logits are computed in >= f32.
    bn_impl: how BN sums its batch statistics, ``"reduce"`` or ``"dot"`` (``BatchNorm.stats``).
  """

  stage_sizes: Sequence[int]
  block: Any
  width: int
  num_classes: int
  stem: str = "cifar"
  mlp_dim: Optional[int] = None
  head_on_mlp: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  param_dtype: Any = None
  bn_impl: str = "reduce"

  @nn.compact
  def __call__(self, x, train: bool = False, mask: Optional[jax.Array] = None):
    x = x.astype(self.dtype)
    if self.stem == "cifar":
      x = nn.relu(_conv_bn(self, x, self.width, 3, 1, 1, train, mask))
    else:
      x = nn.relu(_conv_bn(self, x, self.width, 7, 2, 1, train, mask))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = self.block(
          self.width * 2**i,
          stride,
          dtype=self.dtype,
          conv_impl=self.conv_impl,
          param_dtype=self.param_dtype,
          bn_impl=self.bn_impl,
          name=f"layer{i + 1}_{j}",
        )(x, train, mask)
    out = {"feature_map": x}
    head_dtype = jnp.promote_types(self.dtype, jnp.float32)  # bf16 bodies keep f32 logits
    pooled = jnp.mean(x.astype(head_dtype), axis=(1, 2))
    if self.mlp_dim is not None:
      tokens = FeatureMLP(
        self.mlp_dim,
        self.mlp_dim,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="feature_mlp",
      )(x)
      out["tokens"] = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
      if self.head_on_mlp:
        pooled = jnp.mean(out["tokens"].astype(head_dtype), axis=1)
    out["features"] = pooled
    fan_in = pooled.shape[-1]
    out["logits"] = nn.Dense(
      self.num_classes,
      dtype=head_dtype,
      param_dtype=_param_dtype(self),
      name="classifier",
      kernel_init=torch_linear_init(fan_in),
      bias_init=torch_linear_init(fan_in),
    )(pooled.astype(head_dtype))
    return out


def dtypes(model_config) -> tuple[Any, Any]:
  """``(parameter dtype, compute dtype)`` from ``config.model.dtype`` / ``compute_dtype``.

  ``dtype`` holds the parameters, BN statistics and aggregation (master weights: float32, or
  float64 for the oracles). ``compute_dtype`` is the activations': "bfloat16" is mixed
  precision (bf16 convolutions and activations; BN statistics, the head and the loss in f32);
  "float32" (the default) computes in the master dtype, so float64 oracles stay float64. The
  legacy ``dtype="bfloat16"`` means float32 master weights with bfloat16 compute.
  """
  dtype = str(model_config.get("dtype", "float32"))
  compute = str(model_config.get("compute_dtype", "float32"))
  if dtype == "bfloat16":
    return jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
  if compute == "bfloat16":
    return jnp.dtype(dtype), jnp.dtype(jnp.bfloat16)
  return jnp.dtype(dtype), jnp.promote_types(dtype, compute)


def resolve_conv_impl(impl: str, compute_dtype) -> str:
  """``conv_impl`` with ``"auto"`` resolved: what ``benchmarks/fl_round.py`` measured fastest.

  On XLA:CPU, float32 or bfloat16 compute: ``"onednn"`` when oneDNN and a compiler are
  installed, else ``"eigen"``; float64 on CPU: ``"eigen"`` (oneDNN takes float32 and
  bfloat16); other backends: ``"xla"``. Measured: benchmarks/README.md (fl_round_cpu_small_*,
  round_speed_h200_*). An unknown name, or ``"onednn"`` where it cannot run, raises
  ``errors.ConfigError`` (a ``ValueError``) naming the field and the fix.
  """
  onednn_ok = jnp.dtype(compute_dtype) in onednn_conv.DTYPES
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "xla"
    return "onednn" if onednn_ok and onednn_conv.available() else "eigen"
  if impl not in CONV_IMPLS:
    raise errors.ConfigError(
      f"config.model.conv_impl={impl!r}; choose 'auto' or one of {CONV_IMPLS}."
    )
  if impl == "onednn":
    if not onednn_ok:
      raise errors.ConfigError(
        "config.model.conv_impl='onednn' computes in float32 or bfloat16 (the compute dtype of "
        f"config.model.dtype / compute_dtype here: {jnp.dtype(compute_dtype).name}); use "
        "conv_impl='eigen' or 'auto'."
      )
    why = onednn_conv.unavailable_reason()
    if why:
      raise errors.ConfigError(
        f"config.model.conv_impl='onednn' cannot run here: {why}; {onednn_conv.INSTALL_HINT}."
      )
  return impl


def create_model(model_config, num_classes: int) -> ResNet:
  """Builds the FL model named by ``model_config.name`` ("resnet8" or "resnet50").

  Args:
    model_config: ``config.model``; reads ``name``, ``width``, ``mlp_dim``, ``head_on_mlp``,
      ``dtype``, ``compute_dtype``, ``conv_impl`` and ``bn_impl``.
    num_classes: classifier outputs.
  Returns:
    A ``ResNet`` module.
  """
  mlp_dim = model_config.get("mlp_dim", None)
  head_on_mlp = bool(model_config.get("head_on_mlp", False))
  param_dtype, dtype = dtypes(model_config)
  width = model_config.get("width", 64)
  impl = resolve_conv_impl(model_config.get("conv_impl", "auto"), dtype)
  bn_impl = model_config.get("bn_impl", "reduce")
  if bn_impl not in BN_IMPLS:
    raise ValueError(f"config.model.bn_impl={bn_impl!r}; choose one of {BN_IMPLS}.")
  if model_config.name == "resnet8":
    return ResNet(
      (1, 1, 1), BasicBlock, width, num_classes, "cifar", mlp_dim, head_on_mlp, dtype, impl,
      param_dtype, bn_impl,
    )  # fmt: skip
  if model_config.name == "resnet50":
    return ResNet(
      (3, 4, 6, 3), Bottleneck, width, num_classes, "imagenet", mlp_dim, head_on_mlp, dtype, impl,
      param_dtype, bn_impl,
    )  # fmt: skip
  raise ValueError(
    f"config.model.name={model_config.name!r} is not a known model; "
    "use 'resnet8' (CIFAR, digits) or 'resnet50' (ImageNet-LT)."
  )


MODELS = ("resnet8", "resnet50")
DTYPES = ("float32", "float64", "bfloat16")
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")


def validate(model_config) -> None:
  """Checks ``config.model`` before anything runs; raises ``ValueError`` naming the field."""
  m = model_config
  if m.name not in MODELS:
    raise errors.ConfigError(
      f"config.model.name={m.name!r} is not a known model; "
      "use 'resnet8' (CIFAR, digits) or 'resnet50' (ImageNet-LT)."
    )
  if m.width < 1:
    raise errors.ConfigError(f"config.model.width={m.width} must be >= 1 (CReFF's ResNet-8: 64).")
  if m.mlp_dim is not None and m.mlp_dim < 1:
    raise errors.ConfigError(
      f"config.model.mlp_dim={m.mlp_dim} must be >= 1 (CLIP's width, e.g. 1024), or None."
    )
  if m.head_on_mlp and m.mlp_dim is None:
    raise errors.ConfigError(
      "config.model.head_on_mlp=True needs config.model.mlp_dim (the MLP's width)."
    )
  if m.dtype not in DTYPES:
    raise errors.ConfigError(f"config.model.dtype={m.dtype!r}; choose one of {DTYPES}.")
  compute = m.get("compute_dtype", "float32")
  if compute not in COMPUTE_DTYPES:
    raise errors.ConfigError(
      f"config.model.compute_dtype={compute!r}; choose one of {COMPUTE_DTYPES} "
      "('bfloat16': bf16 compute with float32 master weights)."
    )
  if compute == "float64" and m.dtype != "float64":
    raise errors.ConfigError(
      f"config.model.compute_dtype='float64' needs config.model.dtype='float64' (got {m.dtype!r})."
    )
  resolve_conv_impl(m.conv_impl, dtypes(m)[1])  # raises ConfigError
  bn_impl = m.get("bn_impl", "reduce")
  if bn_impl not in BN_IMPLS:
    raise errors.ConfigError(f"config.model.bn_impl={bn_impl!r}; choose one of {BN_IMPLS}.")
