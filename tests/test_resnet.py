"""Our Flax ResNet-8 against a PyTorch ResNet-8 built as CReFF's ``ResNet_cifar`` is.

The traps this catches (DESIGN.md): stride-2 padding, BN momentum and the unbiased running
variance, masked BN statistics for a partial batch.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedllava.models import resnet

torch = pytest.importorskip(
  "torch", reason="PyTorch is the reference; pip install -r requirements-test.txt"
)
tnn = torch.nn

WIDTH, CLASSES = 8, 5


class TorchBlock(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = tnn.Sequential(
        tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
      )

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu((x if self.down is None else self.down(x)) + y)


class TorchResNet8(tnn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, WIDTH, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(WIDTH)
    self.layers = tnn.ModuleList(
      [
        TorchBlock(WIDTH, WIDTH, 1),
        TorchBlock(WIDTH, 2 * WIDTH, 2),
        TorchBlock(2 * WIDTH, 4 * WIDTH, 2),
      ]
    )
    self.fc = tnn.Linear(4 * WIDTH, CLASSES)

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    for layer in self.layers:
      x = layer(x)
    return self.fc(x.mean(dim=(2, 3)))


def _t(x):
  return torch.tensor(np.asarray(x))


def _copy_into_torch(tm, params, stats):
  def conv(tc, p):
    tc.weight.data = _t(np.transpose(p["kernel"], (3, 2, 0, 1)))

  def bn(tb, p, s):
    tb.weight.data, tb.bias.data = _t(p["scale"]), _t(p["bias"])
    tb.running_mean.data, tb.running_var.data = _t(s["mean"]), _t(s["var"])

  conv(tm.conv1, params["conv1"])
  bn(tm.bn1, params["bn1"], stats["bn1"])
  for i, layer in enumerate(tm.layers):
    p, s = params[f"layer{i + 1}_0"], stats[f"layer{i + 1}_0"]
    conv(layer.conv1, p["conv1"])
    bn(layer.bn1, p["bn1"], s["bn1"])
    conv(layer.conv2, p["conv2"])
    bn(layer.bn2, p["bn2"], s["bn2"])
    if layer.down is not None:
      conv(layer.down[0], p["downsample_conv"])
      bn(layer.down[1], p["downsample_bn"], s["downsample_bn"])
  tm.fc.weight.data = _t(params["classifier"]["kernel"].T)
  tm.fc.bias.data = _t(params["classifier"]["bias"])


def _flax_model(conv_impl="xla", bn_impl="reduce"):
  cfg = ml_collections.ConfigDict(
    dict(name="resnet8", width=WIDTH, conv_impl=conv_impl, bn_impl=bn_impl)
  )
  return resnet.create_model(cfg, CLASSES)


def _setup(conv_impl="xla", bn_impl="reduce"):
  model = _flax_model(conv_impl, bn_impl)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  # Perturb BN so scale/bias/statistics are not the trivial init.
  variables = jax.tree.map(lambda x: x * 1.1 + 0.05, variables)
  tm = TorchResNet8().double()
  _copy_into_torch(tm, variables["params"], variables["batch_stats"])
  tm = tm.float()
  x = np.random.default_rng(0).normal(size=(6, 16, 16, 3)).astype(np.float32)
  return model, variables, tm, x


def test_eval_logits_match_pytorch():
  model, variables, tm, x = _setup()
  tm.eval()
  ours = model.apply(variables, x, train=False)["logits"]
  with torch.no_grad():
    ref = tm(_t(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
  "n_valid, conv_impl, bn_impl",
  [
    (6, "xla", "reduce"),
    (4, "xla", "reduce"),
    (4, "im2col", "reduce"),
    (4, "eigen", "reduce"),
    (6, "xla", "dot"),
    (4, "eigen", "dot"),
  ],
)
def test_train_step_matches_pytorch_sgd(n_valid, conv_impl, bn_impl):
  """One SGD step in train mode: params and running stats (unbiased var) match PyTorch.

  With ``n_valid < 6`` our batch is padded and masked; PyTorch sees only the valid examples.
  ``bn_impl="dot"`` (BN statistics as contractions with the mask) is caught by this test when
  its mask is dropped (the padded examples enter the statistics), or when the variance is not
  centred.
  """
  model, variables, tm, x = _setup(conv_impl, bn_impl)
  y = np.array([0, 1, 2, 3, 4, 0])
  w = (np.arange(6) < n_valid).astype(np.float32)

  def loss_fn(params):
    out, new = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mask=w,
      mutable=["batch_stats"],
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y)
    return jnp.sum(w * ce) / w.sum(), new["batch_stats"]

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)

  tm.train()
  opt = torch.optim.SGD(tm.parameters(), lr=0.1)
  tl = tnn.functional.cross_entropy(tm(_t(x[:n_valid]).permute(0, 3, 1, 2)), _t(y[:n_valid]))
  opt.zero_grad()
  tl.backward()
  opt.step()
  np.testing.assert_allclose(loss, tl.item(), atol=1e-5)
  # Read torch's state back into a Flax-shaped tree by copying ours out and comparing leaves.
  check = TorchResNet8()
  _copy_into_torch(check, params, stats)
  ours_sd, ref_sd = check.state_dict(), tm.state_dict()
  for k in ref_sd:
    if k.endswith("num_batches_tracked"):
      continue
    np.testing.assert_allclose(
      ours_sd[k].numpy(), ref_sd[k].numpy(), atol=2e-5, rtol=1e-4, err_msg=k
    )


def test_feature_map_tokens_and_resnet50_shapes():
  cfg = ml_collections.ConfigDict(dict(name="resnet8", width=WIDTH, mlp_dim=12))
  m = resnet.create_model(cfg, CLASSES)
  v = m.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  out = m.apply(v, jnp.zeros((2, 32, 32, 3)))
  assert out["feature_map"].shape == (2, 8, 8, 4 * WIDTH)
  assert out["tokens"].shape == (2, 64, 12)
  assert out["logits"].shape == (2, CLASSES)
  cfg = ml_collections.ConfigDict(dict(name="resnet50", width=8))
  m = resnet.create_model(cfg, 7)
  v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  out = m.apply(v, jnp.zeros((1, 64, 64, 3)))
  assert out["feature_map"].shape == (1, 2, 2, 8 * 8 * 4)
  assert out["logits"].shape == (1, 7)
  with pytest.raises(ValueError, match="resnet8"):
    resnet.create_model(ml_collections.ConfigDict(dict(name="vgg")), 3)


def test_init_distributions_follow_creff():
  model = _flax_model()
  p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  k = np.asarray(p["layer3_0"]["conv2"]["kernel"])  # 3x3, out 32: std sqrt(2 / (9 * 32))
  assert abs(k.std() - np.sqrt(2 / (9 * 4 * WIDTH))) < 0.1 * np.sqrt(2 / (9 * 4 * WIDTH))
  fc = np.asarray(p["classifier"]["kernel"])
  assert np.abs(fc).max() <= 1 / np.sqrt(4 * WIDTH)


@pytest.mark.parametrize("impl", ["im2col", "eigen"])
@pytest.mark.parametrize("name,hw", [("resnet8", 16), ("resnet50", 32)])
def test_im2col_conv_equals_xla_conv(name, hw, impl):
  """Same parameters, same outputs and gradients (float64), also under vmap over clients."""
  jax.config.update("jax_enable_x64", True)
  try:
    mk = lambda impl: resnet.create_model(
      ml_collections.ConfigDict(  # noqa: E731
        dict(name=name, width=4, dtype="float64", conv_impl=impl)
      ),
      CLASSES,
    )
    xla, im2col = mk("xla"), mk(impl)
    x = np.random.default_rng(0).normal(size=(3, hw, hw, 3))
    v = xla.init(jax.random.PRNGKey(0), x)
    v2 = im2col.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(v) == jax.tree.structure(v2)

    def loss(model, params, xb):
      out, _ = model.apply(
        {"params": params, "batch_stats": v["batch_stats"]}, xb, train=True, mutable=["batch_stats"]
      )
      return jnp.sum(out["logits"] ** 2)

    g1 = jax.grad(lambda p: loss(xla, p, x))(v["params"])
    g2 = jax.grad(lambda p: loss(im2col, p, x))(v["params"])
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, b, atol=1e-9, rtol=1e-6)  # BN backward cancels
    stacked = jax.tree.map(lambda p: jnp.stack([p, 1.1 * p]), v["params"])
    xs = np.stack([x, x[::-1]])
    per = jax.vmap(lambda p, xb: loss(xla, p, xb))(stacked, xs)
    per2 = jax.vmap(lambda p, xb: loss(im2col, p, xb))(stacked, xs)
    np.testing.assert_allclose(per, per2, rtol=1e-10)
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize(
  "hw, cin, cout, k, stride", [(9, 3, 4, 3, 1), (8, 4, 6, 3, 2), (9, 4, 6, 3, 2), (8, 4, 6, 1, 2),
                               (7, 3, 5, 7, 2), (6, 5, 5, 1, 1)]
)  # fmt: skip
def test_eigen_conv_gradients_are_autodiffs_bit_for_bit(hw, cin, cout, k, stride):
  """``eigen_conv``'s hand-written gradients (forward-form convolutions, so XLA:CPU runs them
  through Eigen inside a scan) equal autodiff's of ``lax.conv_general_dilated`` exactly in
  float64: strides 1 and 2, odd and even sizes, 1x1, 3x3 and ResNet-50's 7x7 stem; also
  inside ``lax.scan`` (where XLA:CPU's own gradients take the slow path) and under ``vmap``."""
  jax.config.update("jax_enable_x64", True)
  try:
    rng = np.random.default_rng(0)
    pad = (k - 1) // 2
    x = jnp.asarray(rng.normal(size=(3, hw, hw, cin)))
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)))
    ref = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    ours = lambda x, w: resnet.eigen_conv(x, w, stride, pad)  # noqa: E731
    y = ref(x, w)
    np.testing.assert_array_equal(ours(x, w), y)
    dy = jnp.asarray(rng.normal(size=y.shape))
    for a, b in zip(jax.vjp(ref, x, w)[1](dy), jax.vjp(ours, x, w)[1](dy)):
      np.testing.assert_array_equal(a, b)

    def steps(conv):
      def body(w, xi):
        return w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.sin(conv(xi, w))))(w), None

      return jax.jit(lambda w: jax.lax.scan(body, w, jnp.stack([x, 2 * x]))[0])(w)

    np.testing.assert_allclose(steps(ours), steps(ref), rtol=1e-12, atol=1e-12)
    ws = jnp.stack([w, -w])
    gv = lambda f: jax.vmap(jax.grad(lambda w: jnp.sum(f(x, w) ** 2)))(ws)  # noqa: E731
    np.testing.assert_allclose(gv(ours), gv(ref), rtol=1e-12, atol=1e-12)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_bn_dot_statistics_equal_reductions_float64():
  """``bn_impl="dot"`` (BN statistics as contractions with the example mask) equals
  ``"reduce"`` in float64: logits, parameter gradients and the new running statistics of a
  masked batch, and a vmapped pair of clients. The PyTorch step test above is
  the independent oracle for both."""
  jax.config.update("jax_enable_x64", True)
  try:
    mk = lambda bn: resnet.create_model(  # noqa: E731
      ml_collections.ConfigDict(dict(name="resnet8", width=4, dtype="float64", bn_impl=bn)), CLASSES
    )
    red, dot = mk("reduce"), mk("dot")
    x = np.random.default_rng(0).normal(size=(5, 16, 16, 3)) + 0.7
    w = np.array([1.0, 1.0, 0.0, 1.0, 0.0])
    v = red.init(jax.random.PRNGKey(0), x)

    def loss(model, params, xb):
      out, new = model.apply(
        {"params": params, "batch_stats": v["batch_stats"]},
        xb,
        train=True,
        mask=w,
        mutable=["batch_stats"],
      )
      return jnp.sum(w[:, None] * out["logits"] ** 2), new["batch_stats"]

    vg = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(m, p, x), has_aux=True))  # noqa: E731
    (l1, s1), g1 = vg(red)(v["params"])
    (l2, s2), g2 = vg(dot)(v["params"])
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2))):
      # Relative to each leaf's scale (BN's backward cancels: a few leaves are ~0).
      assert np.max(np.abs(a - b)) <= 1e-9 * np.max(np.abs(b)) + 1e-12
    stacked = jax.tree.map(lambda p: jnp.stack([p, 1.1 * p]), v["params"])
    xs = np.stack([x, x[::-1]])
    per = jax.jit(jax.vmap(lambda p, xb: loss(red, p, xb)[0]))(stacked, xs)
    per2 = jax.jit(jax.vmap(lambda p, xb: loss(dot, p, xb)[0]))(stacked, xs)
    np.testing.assert_allclose(per, per2, rtol=1e-12)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_bn_impl_default_and_validation():
  """The default is ``reduce``; an unknown value is one message naming the field."""
  cfg = ml_collections.ConfigDict(dict(name="resnet8", width=4))
  assert resnet.create_model(cfg, CLASSES).bn_impl == "reduce"
  bad = ml_collections.ConfigDict(
    dict(name="resnet8", width=4, dtype="float32", mlp_dim=None, head_on_mlp=False,
         conv_impl="auto", bn_impl="sum")
  )  # fmt: skip
  with pytest.raises(ValueError, match="config.model.bn_impl='sum'"):
    resnet.validate(bad)
