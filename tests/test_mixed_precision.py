"""``config.model.compute_dtype="bfloat16"``: bf16 compute, float32 master weights and BN statistics.

The accuracy check runs the offline default (digits-LT) at a CI size twice with the same seed,
float32 and bfloat16 compute, and asks bf16 to land within ``MARGIN`` top-1 points of fp32.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_digits

from fedllava import algorithms, federate
from fedllava.federate import client
from fedllava.models import resnet

# Top-1 points. At this size (10 rounds, width 8, 4 clients, 2 local epochs) both runs reached
# 19.22 (measured on 2 CPU cores); the model is still near its head-class phase, so the margin
# is wider than the "within 1 point", which is asked (and measured) at the full default.
MARGIN = 5.0


def _cfg(**kw):
  base = dict(name="resnet8", width=8, dtype="float32", compute_dtype="float32", conv_impl="auto")
  base.update(kw)
  base.setdefault("mlp_dim", None)
  base.setdefault("head_on_mlp", False)
  return ml_collections.ConfigDict(base)


@pytest.mark.parametrize("conv_impl", ["xla", "im2col"])
def test_bf16_compute_keeps_float32_params_and_stats(conv_impl):
  model = resnet.create_model(_cfg(compute_dtype="bfloat16", conv_impl=conv_impl), 10)
  assert model.dtype == jnp.bfloat16
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  out = model.apply(variables, x)
  assert out["feature_map"].dtype == jnp.bfloat16  # the body computes in bf16
  assert out["logits"].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out["logits"])))
  # One local SGD step: parameters and BN statistics stay float32 and finite.
  trainer = client.create_local_trainer(
    model,
    algorithms.fedavg.create(),
    learning_rate=0.1,
    mean=(0.5,) * 3,
    std=(0.25,) * 3,
    crop_padding=1,
    flip=True,
    per_batch_augment=False,
  )
  images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  labels = np.arange(6, dtype=np.int32) % 10
  carry, loss = jax.jit(trainer.step)(
    trainer.init_carry(variables),
    images,
    labels,
    variables["params"],
    jnp.arange(6),
    jnp.ones(6),
    True,
    jax.random.PRNGKey(2),
  )
  params, stats, _ = carry
  for leaf in jax.tree.leaves((params, stats)):
    assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))
  assert bool(jnp.isfinite(loss))
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, variables["params"])
  assert max(jax.tree.leaves(moved)) > 0
  # bf16 compute is close to float32 compute on the same weights (eval logits).
  ref = resnet.create_model(_cfg(conv_impl=conv_impl), 10).apply(variables, x)["logits"]
  assert float(jnp.abs(out["logits"] - ref).max()) < 0.1 * float(jnp.abs(ref).max()) + 0.05


def test_float32_default_and_float64_oracle_dtypes():
  assert resnet.dtypes(_cfg()) == (jnp.float32, jnp.float32)
  # A float64 oracle with the default compute_dtype computes in float64.
  assert resnet.dtypes(_cfg(dtype="float64")) == (jnp.float64, jnp.float64)
  assert resnet.dtypes(_cfg(dtype="float64", compute_dtype="float64")) == (jnp.float64,) * 2
  # Legacy dtype="bfloat16": float32 parameters, bf16 compute.
  assert resnet.dtypes(_cfg(dtype="bfloat16")) == (jnp.float32, jnp.bfloat16)


def test_validate_compute_dtype():
  resnet.validate(_cfg(compute_dtype="bfloat16"))
  resnet.validate(_cfg(dtype="float64", compute_dtype="float64"))
  with pytest.raises(ValueError, match="compute_dtype='float16'"):
    resnet.validate(_cfg(compute_dtype="float16"))
  with pytest.raises(ValueError, match="compute_dtype='float64' needs config.model.dtype"):
    resnet.validate(_cfg(compute_dtype="float64"))


def _digits(compute_dtype):
  return tiny_digits(10, **{"model.compute_dtype": compute_dtype, "fl.local_epochs": 2})


def test_bf16_accuracy_close_to_fp32_on_digits(tmp_path):
  ref = federate.run(_digits("float32"), str(tmp_path / "fp32"))
  res = federate.run(_digits("bfloat16"), str(tmp_path / "bf16"))
  fp32, bf16 = ref.report["final"]["top1"], res.report["final"]["top1"]
  print(f"digits-LT CI size: fp32 top-1 {fp32:.2f}, bf16 top-1 {bf16:.2f}")
  for leaf in jax.tree.leaves(res.variables):
    assert leaf.dtype == jnp.float32
  # The bf16 run really computed in bf16: same seed, different weights.
  diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ref.variables, res.variables)
  assert max(jax.tree.leaves(diffs)) > 1e-6
  assert fp32 > 10.0  # above chance (10 classes)
  assert abs(bf16 - fp32) <= MARGIN, (fp32, bf16)


@pytest.mark.parametrize("name,hw", [("resnet8", 16), ("resnet50", 32)])
def test_shift_conv_equals_xla_conv(name, hw):
  """conv_impl="shift" (im2col by strided slices): same parameters, outputs and gradients as
  nn.Conv in float64, also under vmap over clients (the im2col oracle of test_resnet.py)."""
  jax.config.update("jax_enable_x64", True)
  try:
    mk = lambda impl: resnet.create_model(  # noqa: E731
      _cfg(name=name, width=4, dtype="float64", conv_impl=impl), 10
    )
    xla, shift = mk("xla"), mk("shift")
    x = np.random.default_rng(0).normal(size=(3, hw, hw, 3))
    v = xla.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(v) == jax.tree.structure(shift.init(jax.random.PRNGKey(0), x))

    def loss(model, params, xb):
      out, _ = model.apply(
        {"params": params, "batch_stats": v["batch_stats"]}, xb, train=True, mutable=["batch_stats"]
      )
      return jnp.sum(out["logits"] ** 2)

    g1 = jax.grad(lambda p: loss(xla, p, x))(v["params"])
    g2 = jax.grad(lambda p: loss(shift, p, x))(v["params"])
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, b, atol=1e-9, rtol=1e-6)
    if name != "resnet8":  # the vmapped check once, on the CIFAR model (CI time)
      return
    stacked = jax.tree.map(lambda p: jnp.stack([p, 1.1 * p]), v["params"])
    xs = np.stack([x, x[::-1]])
    per = jax.vmap(lambda p, xb: loss(xla, p, xb))(stacked, xs)
    per2 = jax.vmap(lambda p, xb: loss(shift, p, xb))(stacked, xs)
    np.testing.assert_allclose(per, per2, rtol=1e-10)
  finally:
    jax.config.update("jax_enable_x64", False)
