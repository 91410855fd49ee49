"""PyTorch contenders for ``fl_round.py``: CReFF's own round loop and the best honest PyTorch.

Both train CReFF's ResNet-8 (``ResNet_cifar(resnet_size=8, scaling=4)``, width 64) with local
SGD (lr 0.1, no momentum, no weight decay) and average the whole state dict (parameters and
BN statistics) weighted by client size, as CReFF does (DESIGN.md, "The CReFF protocol").

* ``creff_round``: CReFF's loop as its code runs it: per client, ``load_state_dict`` of the
  global model, a ``DataLoader(batch_size=32, shuffle=True)`` over the client's (already
  normalised) tensors, one crop + flip per batch tensor (CReFF applies its transforms to the
  batch), ``optimizer.zero_grad / backward / step``, then FedAvg over the state dicts.
* ``FastRound``: the best honest PyTorch we could write: each client's uint8 images resident on
  the device, normalised and augmented there per example (crop + flip, as fedllava's default),
  channels_last, bf16 autocast where asked, foreach/fused SGD, ``torch.compile`` where it
  works (CUDA graphs on GPU via ``mode="reduce-overhead"``), FedAvg as a ``torch._foreach``
  weighted sum.

Benchmark-only: ``pip install -r requirements-bench.txt``.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  """CReFF's BasicBlock: two 3x3 convs, residual; 1x1 conv + BN when the shape changes."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu((x if self.down is None else self.down(x)) + y)


class ResNet8(nn.Module):
  """CReFF's ResNet-8 for CIFAR: 3x3 stem, three stages of one BasicBlock, pooled linear head."""

  def __init__(self, width: int = 64, num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.layers = nn.Sequential(
      Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2)
    )
    self.fc = nn.Linear(4 * width, num_classes)
    for m in self.modules():  # CReFF: normal_(0, sqrt(2 / (k * k * out)))
      if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, float(np.sqrt(2.0 / n)))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    return self.fc(self.layers(x).mean(dim=(2, 3)))


def _normalize(u8_nhwc: torch.Tensor, mean, std) -> torch.Tensor:
  x = u8_nhwc.permute(0, 3, 1, 2).float() / 255.0
  m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
  s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
  return (x - m) / s


def _batch_transform(x: torch.Tensor, padding: int, flip: bool, g: torch.Generator):
  """One RandomCrop(padding) + RandomHorizontalFlip for the whole batch tensor (CReFF)."""
  h, w = x.shape[-2:]
  if padding:
    x = F.pad(x, (padding,) * 4)
    i, j = torch.randint(0, 2 * padding + 1, (2,), generator=g).tolist()
    x = x[..., i : i + h, j : j + w]
  if flip and torch.rand((), generator=g).item() < 0.5:
    x = x.flip(-1)
  return x


def fedavg_state_dicts(sds: Sequence[dict], sizes: Sequence[int]) -> dict:
  """CReFF's FedAvg: every state-dict entry weighted by |D_k| / sum |D_k|."""
  w = np.asarray(sizes, np.float64) / float(np.sum(sizes))
  out = {}
  for k in sds[0]:
    acc = sds[0][k].double() * w[0]
    for sd, wk in zip(sds[1:], w[1:]):
      acc = acc + sd[k].double() * wk
    out[k] = acc.to(sds[0][k].dtype)
  return out


def creff_round(
  model: nn.Module,
  global_sd: dict,
  clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
  *,
  epochs: int,
  batch_size: int,
  lr: float,
  padding: int,
  flip: bool,
  seed: int = 0,
) -> dict:
  """One round of CReFF's loop; ``clients`` are (normalised float NCHW, int64 labels) pairs."""
  g = torch.Generator().manual_seed(seed)
  sds, sizes = [], []
  for x, y in clients:
    model.load_state_dict(global_sd)
    model.train()
    loader = torch.utils.data.DataLoader(
      torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
      for xb, yb in loader:
        xb = _batch_transform(xb, padding, flip, g)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sds.append(copy.deepcopy(model.state_dict()))
    sizes.append(len(y))
  return fedavg_state_dicts(sds, sizes)


def creff_clients(images_u8, labels, sizes, mean, std, device="cpu"):
  """CReFF's per-client datasets: normalised float tensors (built once, before the rounds)."""
  out = []
  for im, lb, n in zip(images_u8, labels, sizes):
    x = _normalize(torch.from_numpy(np.ascontiguousarray(im[:n])), mean, std)
    out.append((x.to(device), torch.from_numpy(np.asarray(lb[:n], np.int64)).to(device)))
  return out


class FastRound:
  """The best honest PyTorch round we could write (see the module docstring).

  Args:
    model: a ``ResNet8`` on ``device``.
    images_u8, labels, sizes: per-client uint8 NHWC images, labels and sizes (host arrays).
    compile: ``torch.compile`` the model (``mode="reduce-overhead"`` = CUDA graphs on GPU).
    bf16: autocast the forward/backward to bfloat16 (fp32 master weights, fp32 BN statistics).
  """

  def __init__(
    self,
    model: nn.Module,
    images_u8,
    labels,
    sizes,
    *,
    mean,
    std,
    epochs: int,
    batch_size: int,
    lr: float,
    padding: int,
    flip: bool,
    device: str = "cpu",
    bf16: bool = False,
    compile: bool = False,
    seed: int = 0,
  ):
    self.device = torch.device(device)
    self.model = model.to(self.device).to(memory_format=torch.channels_last)
    self.sizes = [int(n) for n in sizes]
    self.data = [
      (
        torch.from_numpy(np.ascontiguousarray(im[:n])).to(self.device),
        torch.from_numpy(np.asarray(lb[:n], np.int64)).to(self.device),
      )
      for im, lb, n in zip(images_u8, labels, self.sizes)
    ]
    self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
    self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
    self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
    self.padding, self.flip, self.bf16 = padding, flip, bf16
    self.g = torch.Generator(device=self.device).manual_seed(seed)
    self.params = list(self.model.parameters())
    kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
    try:
      self.opt = torch.optim.SGD(self.params, lr=lr, **kw)
    except (RuntimeError, TypeError):
      self.opt = torch.optim.SGD(self.params, lr=lr, foreach=True)
    self.fwd = self.model
    if compile:
      mode = "reduce-overhead" if self.device.type == "cuda" else None
      self.fwd = torch.compile(self.model, mode=mode, dynamic=False)

  def _augment(self, x: torch.Tensor) -> torch.Tensor:
    """Per-example crop (zero padding) and flip, vectorised on the device."""
    b, _, h, w = x.shape
    p = self.padding
    if p:
      xp = F.pad(x, (p,) * 4)
      off = torch.randint(0, 2 * p + 1, (2, b), device=x.device, generator=self.g)
      rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
      cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
      bi = torch.arange(b, device=x.device)[:, None, None, None]
      ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
      x = xp[bi, ci, rows, cols]
    if self.flip:
      f = torch.rand(b, device=x.device, generator=self.g) < 0.5
      x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x

  def _step(self, u8, y):
    x = (u8.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
    x = self._augment(x).contiguous(memory_format=torch.channels_last)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      loss = F.cross_entropy(self.fwd(x), y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def __call__(self, global_sd: dict) -> dict:
    keys = list(global_sd)
    acc = None
    total = float(sum(self.sizes))
    for (u8, y), n in zip(self.data, self.sizes):
      self.model.load_state_dict(global_sd)
      self.model.train()
      for _ in range(self.epochs):
        perm = torch.randperm(n, device=self.device, generator=self.g)
        for s in range(0, n, self.batch_size):
          idx = perm[s : s + self.batch_size]
          self._step(u8[idx], y[idx])
      sd = self.model.state_dict()
      vals = [sd[k].float() for k in keys]
      if acc is None:
        acc = torch._foreach_mul(vals, n / total)
      else:
        torch._foreach_add_(acc, vals, alpha=n / total)
    return {k: a.to(global_sd[k].dtype) for k, a in zip(keys, acc)}
